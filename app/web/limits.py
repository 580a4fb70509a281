"""What guards the app's memory and storage from the outside: a request-body size limit in
front of every route, the routes Gradio would serve that this app never needs closed, and a full
queue said in our words.

- `BodyLimit` (ASGI middleware): a request whose body is larger than WWT_MAX_BODY_MB is answered
  413 with a readable JSON message. A Content-Length over the bound is refused before a byte is
  read; a chunked body is counted as it arrives and refused once it passes the bound, so the
  app never holds more than the bound of one request body.
- `QueueFullWording` (ASGI middleware): Gradio's own answer when its queue is full (WWT_QUEUE_MAX_SIZE;
  HTTP 503 "Queue is full. Max size is N ...") says it in our words, as our other busy refusals do:
  "busy: the server's queue is full (N requests waiting); try again in a moment". Still 503.
- `ClosedRoutes` (ASGI middleware): file uploads are answered 404 before Gradio sees them (the
  app takes no files, so nothing a stranger sends is stored for others to fetch). The named
  endpoints' direct routes outside Gradio's queue (`/gradio_api/api/<name>`,
  `/gradio_api/run/<name>`) are closed by Gradio itself (`queue(api_open=False)`, server.py),
  which still lets the page's own unqueued events through.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from starlette.middleware import Middleware

MAX_BODY_BYTES = 7_000_000  # the registry's default (WWT_MAX_BODY_MB); `wwt serve` passes the configured one


def too_large_message(limit: int) -> str:
    return (f"the request is larger than this app accepts ({limit / 1_000_000:g} MB); "
            f"texts are limited to 1,000,000 characters, which fit whatever they are written in")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: HTTP request bodies over `limit` bytes get 413 and are not read further."""

    def __init__(self, app, limit: Optional[int] = None):
        self.app = app
        self.limit = MAX_BODY_BYTES if limit is None else limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.limit <= 0:
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > self.limit:
            return await self._refuse(send, scope.get("path", ""))

        seen = 0
        over = False       # the body passed the bound: whatever the app answers becomes our 413
        answered = False   # a response has started (the app's, or our 413)

        async def counted_receive():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal answered
            if over:
                if not answered:
                    answered = True
                    await self._refuse(send, scope.get("path", ""))
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        if over and not answered:
            await self._refuse(send, scope.get("path", ""))

    async def _refuse(self, send, path: str = ""):
        message = too_large_message(self.limit)
        if path.startswith("/v1/"):  # the OpenAI-compatible routes answer in OpenAI's shape (openai_api.py)
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": "request_too_large"}}).encode()
        else:
            body = json.dumps({"error": message, "kind": "limit", "limit": "body"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# Gradio's text (gradio/queueing.py, Queue.push), answered with HTTP 503 by /queue/join and /call/{api}.
GRADIO_QUEUE_FULL = re.compile(r"Queue is full\. Max size is (\d+) and size is (\d+)")
MAX_REWRITTEN = 16_384  # a 503 body longer than this is not Gradio's queue-full answer: passed on as it came


def queue_full_message(waiting: int) -> str:
    requests = "request" if waiting == 1 else "requests"
    return f"busy: the server's queue is full ({waiting} {requests} waiting); try again in a moment"


def reworded_queue_full(body: bytes) -> Optional[bytes]:
    """Gradio's queue-full JSON in our words ({"detail", "error", "kind": "busy"}), or None for any other body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    found = GRADIO_QUEUE_FULL.match(detail) if isinstance(detail, str) else None
    if found is None:
        return None
    message = queue_full_message(max(int(found.group(1)), int(found.group(2))))
    # `detail` is where Gradio's clients read an HTTP error; `error` and `kind` as in our own refusals
    return json.dumps({"detail": message, "error": message, "kind": "busy"}).encode()


class QueueFullWording:
    """ASGI middleware: a 503 whose body is Gradio's "Queue is full" gets our wording (status kept);
    every other response passes through untouched (only a 503's body is held, and at most
    MAX_REWRITTEN bytes of it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        start = None        # a 503's start message, held until its body is seen
        held: list = []
        passing = False     # not a 503, or a 503 already sent on: the rest goes through as it comes

        async def rewording_send(message):
            nonlocal start, passing
            if passing:
                return await send(message)
            if start is None:
                if message["type"] == "http.response.start" and message.get("status") == 503:
                    start = message
                    return
                passing = True
                return await send(message)
            if message["type"] != "http.response.body":
                return await send(message)
            held.append(message.get("body", b""))
            more = message.get("more_body", False)
            if more and sum(len(b) for b in held) <= MAX_REWRITTEN:
                return
            body, headers = b"".join(held), list(start.get("headers", []))
            new = None if more else reworded_queue_full(body)
            if new is not None:
                body = new
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            passing = True
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": more})

        await self.app(scope, receive, rewording_send)


# Paths under Gradio's API root that stay closed, as a regular expression over the path.
CLOSED = re.compile(r"(^|/)gradio_api/upload(_progress)?/?$")
CLOSED_MESSAGE = "this app takes no files; nothing was stored"


class ClosedRoutes:
    """ASGI middleware: 404 with a readable JSON line for the paths in CLOSED; the body is not read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not CLOSED.search(scope.get("path", "")):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": CLOSED_MESSAGE, "error": CLOSED_MESSAGE, "kind": "not_found"}).encode()
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def middleware(max_body_bytes: int = MAX_BODY_BYTES) -> list:
    """For `FastAPI(middleware=...)` (app/server.py's app_kwargs)."""
    return [Middleware(ClosedRoutes), Middleware(BodyLimit, limit=max_body_bytes), Middleware(QueueFullWording)]
