"""Keeps `wwt serve`'s memory near its warm size however many calls it answers (app/bench/memory.py
measures it). Two causes, two remedies, both in one ASGI middleware, `Upkeep`:

- Gradio's per-call bookkeeping (gradio/queueing.py, 6.x). Every plain-HTTP call
  (`POST /gradio_api/call/<name>`, then `GET .../<event_id>`) opens a session of its own and
  leaves behind an entry in `Queue.pending_event_ids_session` (an empty set, never removed: grows
  by one per call, for ever, and `GET /call/...` searches it linearly) and an `asyncio.Queue` in
  `Queue.pending_messages_per_session` (up to 2,000). A result nobody fetches stays in the
  latter with a status message per queue update: about 130 kB per call on the tiny model, more
  on a real one's 1,024-token scores. `sweep` drops a session's entries once none of its events
  is queued or running and nothing is left to read; a finished result that is not read is kept
  UNREAD_TTL_S at most, and at most UNREAD_MAX of them (oldest dropped first), so callers who never
  read cannot fill memory. Queued and running events are never touched. A GET for a result that
  is no longer kept (or was read already) is answered 404 with a message; Gradio itself would cut
  the stream off with a traceback in the log, or, for a result read twice, wait for ever.
- The C heap. Tokenizing a 1 MB text (/score, /classify tokenize all of it) allocates over 100 MB
  in many small pieces; glibc keeps freed memory inside its heaps (between live chunks), so RSS
  stays near the high-water mark of the busiest moment. `trim_heap` (glibc `malloc_trim(0)`,
  what glibc offers for exactly this) hands free pages back: about 18 ms for 150 MB, 0.1 ms when
  there is nothing to give. It runs every TRIM_EVERY_S while requests come, and once more
  TRIM_EVERY_S after the last, in a worker thread. On a C library without it, nothing happens.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Optional

from starlette.middleware import Middleware

from model.serving.heap import trim_heap

SWEEP_EVERY_S = 1.0    # Gradio's bookkeeping is swept after a request at most this often
UNREAD_TTL_S = 60.0    # a finished call's result is kept this long for its GET (clients read at once)
UNREAD_MAX = 200       # and at most this many unread results at a time
TRIM_EVERY_S = 5.0     # heap trims while requests come, and this long after the last one
CALL_RESULT = re.compile(r"/gradio_api/call/(?:v2/)?[^/]+/([^/]+)/?$")  # GET: a plain-HTTP call's result

def sweep(queue, unread: dict, now: Optional[float] = None) -> None:
    """Drop what Gradio's queue keeps for finished calls (see the module's docstring).

    `unread` (session -> when its result was first seen unread, oldest first) lives between calls.
    Runs on the event loop, as every change Gradio makes to these tables does."""
    ids = getattr(queue, "pending_event_ids_session", None)
    boxes = getattr(queue, "pending_messages_per_session", None)
    live = getattr(queue, "event_ids_to_events", None)
    if ids is None or boxes is None or live is None:
        return  # another Gradio: nothing we know how to clean
    now = time.monotonic() if now is None else now

    def drop(session):
        ids.pop(session, None)
        boxes.pop(session, None)
        unread.pop(session, None)

    for session in list(boxes) + [s for s in ids if s not in boxes]:  # oldest first, as both tables are
        pending = ids.get(session) or ()
        if any(event_id in live for event_id in pending):
            unread.pop(session, None)  # queued or running: its reader may be waiting
            continue
        box = boxes.get(session)
        if not pending and (box is None or box.empty()):
            drop(session)  # finished and read
        else:
            unread.setdefault(session, now)  # finished, not (all) read yet
    for session in [s for s in unread if s not in ids and s not in boxes]:
        del unread[session]
    while unread:
        session, seen = next(iter(unread.items()))
        if len(unread) <= UNREAD_MAX and now - seen < UNREAD_TTL_S:
            break
        drop(session)


def result_kept(queue, event_id: str) -> bool:
    """Whether Gradio still holds the call `event_id` (queued, running, or its result unread)."""
    ids = getattr(queue, "pending_event_ids_session", None)
    live = getattr(queue, "event_ids_to_events", None)
    if ids is None or live is None:
        return True  # another Gradio: let it answer
    return event_id in live or any(event_id in pending for pending in ids.values())


def _queue(scope):
    blocks = getattr(scope.get("app"), "get_blocks", lambda: None)()
    return getattr(blocks, "_queue", None)


async def _not_kept(send) -> None:
    body = json.dumps({"error": f"no result for this call: it was read already, or not fetched within "
                                f"{UNREAD_TTL_S:g} s of finishing", "kind": "not_found"}).encode()
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Upkeep:
    """ASGI middleware: after each HTTP request, `sweep` Gradio's queue (at most every SWEEP_EVERY_S)
    and keep heap trims coming (`trim_heap`, every TRIM_EVERY_S while requests come, and once more
    TRIM_EVERY_S after the last); a GET for a call result Gradio no longer holds gets our 404."""

    def __init__(self, app):
        self.app = app
        self.unread: dict = {}
        self.swept = float("-inf")
        self.seen = float("-inf")      # when the last request ended (the loop's clock)
        self.trimmed = float("-inf")   # when the last trim was started
        self.timer: Optional[asyncio.TimerHandle] = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            found = CALL_RESULT.search(scope.get("path", "")) if scope.get("method") == "GET" else None
            queue = _queue(scope) if found else None
            if queue is not None and not result_kept(queue, found.group(1)):
                return await _not_kept(send)
            await self.app(scope, receive, send)
        finally:
            self._after(scope)

    def _after(self, scope) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self.swept >= SWEEP_EVERY_S:
            self.swept = now
            queue = _queue(scope)
            if queue is not None:
                sweep(queue, self.unread, time.monotonic())
        self.seen = now
        if self.timer is None:
            self.timer = loop.call_later(TRIM_EVERY_S, self._tick, loop)

    def _tick(self, loop) -> None:
        self.timer = None
        if self.trimmed >= self.seen + TRIM_EVERY_S:
            return  # trimmed since requests stopped: nothing new to give back
        self.trimmed = loop.time()
        try:
            loop.run_in_executor(None, trim_heap)
        except RuntimeError:  # the loop is shutting down
            return
        self.timer = loop.call_later(TRIM_EVERY_S, self._tick, loop)


def middleware() -> list:
    """For `FastAPI(middleware=...)` (app/server.py's app_kwargs)."""
    return [Middleware(Upkeep)]
