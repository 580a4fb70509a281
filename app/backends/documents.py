"""Shared documents: a link that reopens a text. Unguessable ids, a size limit, an expiry."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Optional

from model import settings
from model.errors import BadRequest, BackendUnavailable

MAX_DOCUMENT_BYTES = 1_000_000
DOCUMENT_TTL_S = 30 * 24 * 3600
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def new_document_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits: not guessable, safe in a URL


def check_document(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("the document is empty; there is nothing to share")
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise BadRequest(f"the document is larger than {MAX_DOCUMENT_BYTES // 1000} kB and cannot be shared")
    return text


def check_id(doc_id: str) -> str:
    if not isinstance(doc_id, str) or not _ID.match(doc_id):
        raise BadRequest("that is not a valid document link")
    return doc_id


class FileDocumentStore:
    """The embedded mode's store: one JSON file per document in a folder."""

    def __init__(self, folder: Optional[str] = None, ttl_s: int = DOCUMENT_TTL_S):
        default = Path(settings.get("WWT_DATA_DIR")).expanduser()
        self.folder = Path(folder) if folder else default / "documents"
        self.ttl_s = ttl_s

    def save(self, text: str) -> str:
        check_document(text)
        self.folder.mkdir(parents=True, exist_ok=True)
        doc_id = new_document_id()
        payload = {"text": text, "expires": time.time() + self.ttl_s}
        tmp = self.folder / f".{doc_id}.tmp"
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        tmp.replace(self.folder / f"{doc_id}.json")
        return doc_id

    def load(self, doc_id: str) -> str:
        path = self.folder / f"{check_id(doc_id)}.json"
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            raise BadRequest("no shared document at that link (it may have expired)") from None
        if payload.get("expires", 0) < time.time():
            path.unlink(missing_ok=True)
            raise BadRequest("no shared document at that link (it may have expired)")
        return payload["text"]


class RedisDocumentStore:
    """The distributed mode's store: documents in Redis with an expiry, shared by every app replica."""

    prefix = "wwt:doc:"

    def __init__(self, client, ttl_s: int = DOCUMENT_TTL_S):
        self.client = client
        self.ttl_s = ttl_s

    def save(self, text: str) -> str:
        check_document(text)
        doc_id = new_document_id()
        try:
            self.client.set(self.prefix + doc_id, text.encode("utf-8", errors="surrogatepass"), ex=self.ttl_s)
        except Exception as e:
            raise BackendUnavailable(f"cannot reach Redis to save the document: {e}") from None
        return doc_id

    def load(self, doc_id: str) -> str:
        try:
            data = self.client.get(self.prefix + check_id(doc_id))
        except BadRequest:
            raise
        except Exception as e:
            raise BackendUnavailable(f"cannot reach Redis to load the document: {e}") from None
        if data is None:
            raise BadRequest("no shared document at that link (it may have expired)")
        return data.decode("utf-8", errors="surrogatepass") if isinstance(data, bytes) else data
