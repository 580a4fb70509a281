"""Partial suggestions from a worker to the app, over Redis pub/sub, one channel per task.

The app subscribes to `wwt:stream:<task id>` before it sends the task (it picks the id), so
nothing published is missed; the worker publishes each snapshot the engine hands it (the
newest only, when steps come faster than Redis takes them) and one `end` message when the
task's answer is ready. The answer itself still travels as the task's result: pub/sub keeps
nothing for a late reader, a result does. A blocking read on the subscription wakes the app
when a message lands: no polling, no extra round trip per token.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from model.streaming import partial_event

log = logging.getLogger("wwt.worker")

CHANNEL_PREFIX = "wwt:stream:"
END = {"type": "end"}


def channel(task_id: str) -> str:
    return CHANNEL_PREFIX + task_id


class Publisher:
    """(worker) Sends a streamed task's snapshots; Redis trouble never fails the task itself."""

    def __init__(self, client, task_id: str):
        self.client, self.channel, self.failed = client, channel(task_id), False

    def _send(self, message: dict) -> None:
        try:
            self.client.publish(self.channel, json.dumps(message, ensure_ascii=False))
        except Exception as e:
            if not self.failed:  # once per task: the answer still comes through the result
                log.warning("could not publish partial suggestions: %s", e)
            self.failed = True

    def partial(self, suggestions) -> None:
        self._send(partial_event(suggestions))

    def end(self) -> None:
        self._send(END)


class Subscription:
    """(app) The messages of one task's channel, subscribed before the task is sent."""

    def __init__(self, client, task_id: str):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel(task_id))

    def get(self, timeout: float) -> Optional[dict]:
        """The next message, waiting at most `timeout` seconds; None if none came."""
        message = self.pubsub.get_message(timeout=timeout)
        if message is None or message.get("type") != "message":
            return None
        try:
            data = json.loads(message["data"])
        except (TypeError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def close(self) -> None:
        try:
            self.pubsub.close()
        except Exception:
            pass
