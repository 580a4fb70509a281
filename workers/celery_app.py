"""The Celery app: one Redis for broker and results, one queue per model, settings chosen on purpose.

Nothing is built at import: `make_app(url)` builds an app when a worker or the app's Celery
backend asks for one, so settings that contradict each other are a `QueueMisconfigured`
error with a readable message where it is caught, not a traceback at import. For
`celery -A workers.celery_app inspect ping` the module's `app` is built on first access,
from WWT_REDIS_URL. Workers are started with `wwt worker --model NAME` (workers/worker.py),
which loads the model first.
"""

from __future__ import annotations

from celery import Celery

from .queues import TASK_NAME, QueueConfig, QueueMisconfigured, queue_name, redis_url

__all__ = ["TASK_NAME", "QueueConfig", "QueueMisconfigured", "make_app", "queue_name"]


def make_app(url: str | None = None, queue: QueueConfig | None = None) -> Celery:
    """A Celery app for one Redis URL (password included: redis://:PASSWORD@host:6379/0) and the
    queue's configuration (default: the registry's defaults; QueueConfig checks its consistency)."""
    url = redis_url(url)
    queue = queue or QueueConfig()
    limits = {"soft": queue.soft_time_limit, "hard": queue.time_limit, "visibility": queue.visibility_timeout,
              "restore": queue.restore_interval}
    app = Celery("wwt", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        # Requests and results cross the queue as plain JSON (model.types to_dict/from_dict);
        # never pickle, so a message cannot run code in a worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Late acknowledgement: a task is acknowledged when it has finished, not when a worker
        # takes it, so a worker that dies mid-task leaves it to be redelivered to another one.
        task_acks_late=True,
        # ...and when the worker's pool loses the task (killed by a signal, out of memory),
        # the message is rejected and re-queued instead of being acknowledged as failed.
        task_reject_on_worker_lost=True,
        # A redelivered copy of a task that already succeeded (its first worker finished but
        # could not acknowledge in time) is answered from the stored result, not run again.
        worker_deduplicate_successful_tasks=True,
        # Prefetch of one per thread: a worker reserves only as many tasks as it can run now,
        # so a busy worker never sits on tasks that an idle worker on the same queue could run.
        worker_prefetch_multiplier=1,
        # Time limits. The soft limit is what the engine honours: every request's max_time is
        # capped at it (tasks.py), so decoding stops and the suggestions so far come back.
        # The hard limit bounds a task as a whole; the threads pool (see worker.py) cannot kill
        # a thread, so for it the hard limit is the bound the visibility timeout is checked
        # against, and a prefork pool would enforce it by killing the child.
        task_soft_time_limit=limits["soft"],
        task_time_limit=limits["hard"],
        # Results are read once, at once, by the app; keep them only long enough for that.
        result_expires=int(queue.result_expires),
        broker_transport_options={
            # Longer than the hard limit (checked by QueueConfig): only a task whose worker
            # died is ever redelivered.
            "visibility_timeout": limits["visibility"],
            # How often a worker sweeps for tasks abandoned by a dead worker; every sweep
            # really scans (throttle 1), a cheap ZRANGE on one small sorted set.
            "unacked_restore_interval": limits["restore"],
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 3,
        },
        # Fail fast when Redis is down instead of retrying for a long time: the app turns
        # the failure into a clear "cannot reach Redis" message.
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.5},
        redis_socket_connect_timeout=3,
        redis_socket_timeout=10,
        # Every model has its own queue, created on first use; nothing goes to a default one.
        task_create_missing_queues=True,
        task_default_queue="wwt.default",
        # No task events or remote-control chatter beyond what Celery needs.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    from . import tasks

    tasks.register(app)
    return app


_default_app = None


def __getattr__(name: str):
    """`workers.celery_app.app` (what `celery -A workers.celery_app ...` looks for, an entry point of
    its own): built on first access from the settings registry, never at import. Connects lazily."""
    global _default_app
    if name == "app":
        if _default_app is None:
            import sys

            from model import settings
            from model.errors import OPERATOR, WWTError

            try:
                _default_app = make_app(settings.get("WWT_REDIS_URL"), QueueConfig.from_settings())
            except (WWTError, settings.SettingError) as e:  # one line, as `wwt worker` says it
                print(f"error: {e.text_for(OPERATOR) if isinstance(e, WWTError) else e}", file=sys.stderr)
                raise SystemExit(2) from None
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
