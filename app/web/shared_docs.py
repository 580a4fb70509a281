"""Shared documents over HTTP, two rights apart: a link reads, the author's delete key deletes.

    POST   /wwt/doc        {"text": ...}  -> 200 {"id", "url", "delete_key"}
    GET    /wwt/doc/{id}                  -> 200 {"id", "text"}; 404 when there is none
    DELETE /wwt/doc/{id}   Authorization: Bearer <delete_key>  -> 200 {"ok": true}; 403 without
                                          the key or with another one (nothing deleted); 404 none

The page's Share button uses these routes too, and keeps the delete key in the author's
browser only, so a link opened anywhere else reads but cannot delete. Keys are stored hashed.
A refusal is JSON {"ok": false, "error": a readable line, "kind", and for a limit "limit"}:
past the client's share rate 429 with Retry-After; storage full 507; a document too large
413; bad input 400; the store unreachable 503. Who the client is: client_identity.py.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from model import contract
from model.errors import (BackendUnavailable, BadRequest, Forbidden, LimitReached, NotFound, WWTError,
                          caller_error)

log = logging.getLogger(__name__)

PATH = "/wwt/doc"
LIMIT_STATUS = {"rate": 429, "storage": 507, "size": 413}
HEADERS = {"Cache-Control": "no-store"}


def status_of(error: WWTError) -> int:
    if isinstance(error, LimitReached):
        return LIMIT_STATUS.get(error.limit, 429)
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Forbidden):
        return 403
    if isinstance(error, BadRequest):
        return 400
    if isinstance(error, BackendUnavailable):
        return 503
    return 500


def refusal(error: WWTError) -> JSONResponse:
    """What a visitor reads when a document call is refused, with the status a client expects."""
    body = {"ok": False, "error": error.message, "kind": error.kind}
    headers = dict(HEADERS)
    if isinstance(error, LimitReached):
        body["limit"] = error.limit
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(body, status_code=status_of(error), headers=headers)


def bearer(request: Request) -> Optional[str]:
    """The delete key from `Authorization: Bearer <key>`, else None."""
    value = request.headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def routes(backend) -> list:
    async def share(request: Request):
        try:
            try:
                data = await request.json()
            except Exception:
                raise BadRequest("the request body must be JSON: {\"text\": \"...\"}") from None
            text = data.get("text") if isinstance(data, dict) else None
            text = contract.clean_text(text, "document", required=True)
            client = request.client.host if request.client else None
            doc_id, key = await run_in_threadpool(backend.save_document, text, client)
        except Exception as e:
            return refusal(caller_error(e, log, "share"))
        return JSONResponse({"ok": True, "id": doc_id, "url": f"?doc={doc_id}", "delete_key": key}, headers=HEADERS)

    async def read(request: Request):
        doc_id = request.path_params["doc_id"]
        try:
            text = await run_in_threadpool(backend.load_document, doc_id)
        except Exception as e:
            return refusal(caller_error(e, log, "open shared document"))
        return JSONResponse({"ok": True, "id": doc_id, "text": text}, headers=HEADERS)

    async def delete(request: Request):
        doc_id = request.path_params["doc_id"]
        try:
            await run_in_threadpool(backend.delete_document, doc_id, bearer(request))
        except Exception as e:
            return refusal(caller_error(e, log, "delete shared document"))
        return JSONResponse({"ok": True}, headers=HEADERS)

    return [Route(PATH, share, methods=["POST"]),
            Route(PATH + "/{doc_id}", read, methods=["GET"]),
            Route(PATH + "/{doc_id}", delete, methods=["DELETE"])]
