"""What guards the app's memory and storage from the outside: a request-body size limit in
front of every route, and the shared-document routes a plain HTTP client can call.

- `BodyLimit` (ASGI middleware): a request whose body is larger than WWT_MAX_BODY_MB is answered
  413 with a readable JSON message. A Content-Length over the bound is refused before a byte is
  read; a chunked body is counted as it arrives and refused once it passes the bound, so the
  app never holds more than the bound of one request body.
- `DELETE /wwt/doc/{id}`: delete a shared document. Holding the link (the 128-bit id) is what
  allows it, as in the page's "Delete" button.
"""

from __future__ import annotations

import json
from typing import Optional

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from model import settings
from model.errors import BadRequest, WWTError


def max_body_bytes() -> int:
    return int(settings.get_float("WWT_MAX_BODY_MB") * 1_000_000)


def too_large_message(limit: int) -> str:
    return (f"the request is larger than this app accepts ({limit / 1_000_000:g} MB); "
            f"texts are limited to 1,000,000 characters")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: HTTP request bodies over `limit` bytes get 413 and are not read further."""

    def __init__(self, app, limit: Optional[int] = None):
        self.app = app
        self.limit = max_body_bytes() if limit is None else limit

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
            return await self._refuse(send)

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
                    await self._refuse(send)
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        if over and not answered:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": too_large_message(self.limit), "kind": "limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def middleware() -> list:
    """For `FastAPI(middleware=...)` (app/server.py's app_kwargs)."""
    return [Middleware(BodyLimit)]


def routes(backend) -> list:
    """DELETE /wwt/doc/{id}: 200 {"ok": true}; 404 when there is no such document; 400 for a bad id."""

    async def delete_document(request: Request):
        from starlette.concurrency import run_in_threadpool

        doc_id = request.path_params["doc_id"]
        try:
            await run_in_threadpool(backend.delete_document, doc_id)
        except BadRequest as e:
            status = 404 if "no shared document" in e.message else 400
            return JSONResponse({"ok": False, "error": e.message, "kind": e.kind}, status_code=status)
        except WWTError as e:
            return JSONResponse({"ok": False, "error": e.message, "kind": e.kind}, status_code=503)
        return JSONResponse({"ok": True})

    return [Route("/wwt/doc/{doc_id}", delete_document, methods=["DELETE"])]
