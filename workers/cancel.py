"""Cancelling stale requests across the queue.

An editor that asks again makes its previous request stale. The app marks the older task
cancelled in Redis; a worker that is running it (or picks it up later) sees the mark and
frees the engine's slots instead of finishing an answer nobody will read.
"""

from __future__ import annotations

LATEST_PREFIX = "wwt:latest:"  # supersede key -> id of its newest task
CANCEL_PREFIX = "wwt:cancel:"  # task id -> present when the task is stale
TTL_S = 600


def supersede(client, key: str, task_id: str) -> None:
    """Record `task_id` as the newest task for `key`; mark the one it replaces cancelled."""
    older = client.set(LATEST_PREFIX + key, task_id, ex=TTL_S, get=True)
    if older is not None:
        older = older.decode() if isinstance(older, bytes) else older
        if older != task_id:
            client.set(CANCEL_PREFIX + older, 1, ex=TTL_S)


def is_cancelled(client, task_id: str) -> bool:
    return bool(client.exists(CANCEL_PREFIX + task_id))


def cancel_task(client, task_id: str) -> None:
    """Mark one task stale: its reader went away (a streamed request whose client hung up)."""
    client.set(CANCEL_PREFIX + task_id, 1, ex=TTL_S)
