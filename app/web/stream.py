"""POST /wwt/stream: suggestions as they are written, as Server-Sent Events.

Request (same origin as the page; under a root path, relative to the app's root):

    POST /wwt/stream
    Content-Type: application/json
    {"before": "text before the cursor", "model": "", "n": 3, "max_new_tokens": 64,
     "temperature": 1.0, "top_k": 0, "top_p": 0.9, "fresh": false, "client": "editor-id",
     "seed": null}

Every field but `before` may be left out (the page's defaults; an empty model is the
default one). The body is read as the editor's Tab reads it
(callbacks.page_request). `client` is a supersede key: a newer request with the same
key cancels this one. `seed` (a whole number >= 0) makes the answer repeatable.

Response: 200, `text/event-stream`, one event per message, each `data` a JSON object:

    event: partial
    data: {"type": "partial", "suggestions": [{"index": 0, "text": " and the", "finished": false,
           "finish_reason": null}, ...]}

    event: done
    data: {"type": "done", "result": {"model": ..., "suggestions": [{"text", "token_ids",
           "logprobs", "finish_reason"}], "timings": {...}, "healed": ...},
           "answer": {"ok": true, "model": ..., "suggestions": [{"text", "finish"}], "info": ..., ...}}

    event: error
    data: {"type": "error", "error": "max_new_tokens must be ...", "kind": "bad_request",
           "answer": {"ok": false, "error": "max_new_tokens must be ..."}}

`answer` is what the page shows, in the same shape as the editor's Tab call answers
(callbacks.page_answer): the page reads one shape whichever way the answer came.

Zero or more partial events, then exactly one done or error event, then the stream ends.
Bad input is an error event too (still status 200), so a client has one path to read. Each
partial holds every suggestion so far in full (not a delta): a missed or skipped one loses
nothing, and events a slow reader has not taken yet are merged into the newest. A partial
text only grows; the done event is authoritative (model/streaming.py says exactly what is
promised). Closing the connection cancels the request: its KV-cache slots are freed at once
(distributed: within the worker's cancel check, 0.2 s).

Why SSE over a mounted route: the editor must cancel by hanging up and read each event the
moment it is written; Gradio's generator endpoints need a queue join and a second request,
and keep running after the client is gone. SSE (rather than NDJSON) because proxies, Spaces'
included, pass `text/event-stream` through unbuffered, and it is what Gradio's own API uses,
so `curl -N` reads both alike. POST, because the text can be long: the browser reads the
body with fetch() (EventSource can only GET).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Optional
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from app.backends.base import Backend, EventStream
from model.errors import BadRequest, Busy, caller_error
from model.streaming import error_event
from model.types import Completion

from . import ops
from .callbacks import DEFAULTS, page_answer, page_request

log = logging.getLogger(__name__)

PATH = "/wwt/stream"
MAX_STREAMS = 64  # streams written at once; past it a request is answered Busy (kind "busy") at once
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_NOT_JSON = object()


def start(backend: Backend, data, client=None) -> EventStream:
    """The events for one request body (a dict), checked against the contract first. `client`:
    the caller's address, held to the per-client waiting bound."""
    try:
        if data is _NOT_JSON:
            raise BadRequest("the request body must be JSON")
        request, supersede = page_request(backend, data)
        return backend.stream(request, client=client if client is not None else supersede, supersede=supersede)
    except Exception as e:  # one place decides what the reader is told (model/errors.py)
        return _one(error_event(caller_error(e, log, "stream request")))


def with_page_answer(event: dict, asked: int) -> dict:
    """The done or error event with the answer in the page's shape added (callbacks.page_answer)."""
    if event["type"] == "done":
        return {**event, "answer": page_answer(Completion.from_dict(event["result"]), asked)}
    if event["type"] == "error":
        return {**event, "answer": {"ok": False, "error": event.get("error") or "no answer"}}
    return event


def _one(event: dict) -> EventStream:
    return EventStream(iter([event]))


def sse(event: dict) -> bytes:
    return f"event: {event.get('type', 'message')}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


class StreamCount:
    """A count of the streams being written (this route's and /v1's), bounded by MAX_STREAMS."""

    def __init__(self, limit: Optional[int] = None):
        self.limit, self.used, self.lock = MAX_STREAMS if limit is None else limit, 0, threading.Lock()

    def take(self, count: int = 1) -> bool:
        with self.lock:
            if self.used + count > self.limit:
                return False
            self.used += count
            return True

    def give(self, count: int = 1) -> None:
        with self.lock:
            self.used -= count


async def _events(backend: Backend, data, request: Request, streams: StreamCount):
    """Run the (blocking) event iterator on its own thread and send each event as it comes;
    partials that pile up behind a slow reader are merged into the newest (each is complete)."""
    started = time.perf_counter()
    model = await asyncio.to_thread(ops.model_label, backend, data.get("model") if isinstance(data, dict) else None)
    outcome = ["cancelled"]  # until a done or error event is written: the reader hung up
    n = data.get("n") if isinstance(data, dict) else None
    asked = n if isinstance(n, int) and not isinstance(n, bool) else DEFAULTS["n"]
    if not streams.take():
        ops.record("stream", model, started, "busy")
        yield sse(error_event(Busy(f"busy: {streams.limit} suggestions are being written; try again in a moment")))
        return
    try:
        client = getattr(request.client, "host", None) or None
        events = await asyncio.to_thread(start, backend, data, client)  # asks the backend which models it offers
    except BaseException:
        streams.give()
        raise
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the server's loop is gone (shutting down)
            events.cancel()

    def pump() -> None:
        try:
            for event in events:
                put(event)
        finally:
            put(None)
            streams.give()

    async def hang_up() -> None:  # for servers that do not cancel the response when the client goes
        while (await request.receive())["type"] != "http.disconnect":
            pass
        events.cancel()

    threading.Thread(target=pump, name="wwt-stream", daemon=True).start()
    watcher = asyncio.create_task(hang_up())
    try:
        ended = False
        while not ended:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            for event, following in zip(batch, batch[1:] + [None]):
                if event is None:
                    ended = True
                    break
                if event["type"] == "partial" and following is not None and following["type"] == "partial":
                    continue  # the newer snapshot holds everything this one does
                if event["type"] in ("done", "error"):
                    outcome[0] = None if event["type"] == "done" else event.get("kind", "error")
                    event = with_page_answer(event, asked)
                yield sse(event)
    finally:
        ops.record("stream", model, started, outcome[0])
        watcher.cancel()
        if not events.ended:
            events.cancel()  # the client went away: free the slots now


def routes(backend: Backend, streams: Optional[StreamCount] = None) -> list:
    """The routes to mount on the app's server (server.app_kwargs passes them to Gradio's FastAPI)."""
    streams = streams or StreamCount()

    async def endpoint(request: Request):
        try:
            data = await request.json()
        except Exception:
            data = _NOT_JSON
        return StreamingResponse(_events(backend, data, request, streams), media_type="text/event-stream",
                                 headers=HEADERS)

    return [Route(PATH, endpoint, methods=["POST"])]
