"""Shared documents: a link that reopens a text. Unguessable ids, a size limit, an expiry,
a per-client share rate, a bound on the total stored, and deletion by whoever holds the link.

The id is the capability: 128 random bits, so holding the link is what lets one open the
document and delete it. Every refusal (rate, storage, size) stores nothing.

Embedded (FileDocumentStore): one file per document; the total is counted in bytes on disk
(each file at least one 4 kB block, what it really takes), kept as a running sum that a sweep
recomputes; expired files are removed by that sweep, which runs on a save at most once a
minute (and when the store is full) and stops after SWEEP_BUDGET_S.

Distributed (RedisDocumentStore): documents under `wwt:doc:<id>`, plus their own accounting
key space `wwt:docs:*`: a sorted set of ids by expiry, a hash of sizes and a byte counter,
changed together by Lua scripts (atomic across app replicas). A save first drops expired
entries from the accounting, then refuses when the counter would pass the bound, so the
documents can never take more than WWT_DOCUMENTS_MAX_MB of the Redis that the broker and the
suggestion cache also use.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections import OrderedDict
import re
import secrets
import time
from pathlib import Path
from typing import Optional

from model.errors import BadRequest, BackendUnavailable, Forbidden, LimitReached, NotFound

MAX_DOCUMENT_BYTES = 1_000_000
DOCUMENT_TTL_S = 30 * 24 * 3600
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
BLOCK = 4096            # a file takes at least one block on disk
SWEEP_EVERY_S = 60.0    # embedded: expired files are looked for at most this often (and when full)
SWEEP_BUDGET_S = 0.25   # ... and one sweep stops after this long
MAX_CLIENTS = 10_000    # embedded rate limiter: clients remembered at most


# The registry's defaults (WWT_SHARE_LIMIT, WWT_SHARE_WINDOW_S, WWT_DOCUMENTS_MAX_MB, WWT_DATA_DIR);
# the app's entry points pass the configured values (app/app_config.py).
SHARE_LIMIT = 10
SHARE_WINDOW_S = 600.0
MAX_TOTAL_BYTES = 200_000_000
DEFAULT_FOLDER = "~/.cache/write-with-transformer/documents"


def full_message() -> str:
    return ("the shared-document storage is full; nothing was saved. Try again later, or delete "
            "documents you no longer need")


def storage_full() -> LimitReached:
    return LimitReached(full_message(), limit="storage")


GONE = "no shared document at that link (it may have expired or been deleted)"
NOT_YOURS = ("only the delete key given to whoever shared this document can delete it (the link only "
             "opens it); nothing was deleted")


def new_delete_key() -> str:
    return secrets.token_urlsafe(24)  # 192 bits, handed to the author once; only its hash is kept


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()


def key_matches(stored_hash, key) -> bool:
    """Whether `key` is the delete key whose hash is stored (documents shared before keys existed have none)."""
    if not stored_hash or not isinstance(key, str) or not key or len(key) > 200:
        return False
    return hmac.compare_digest(str(stored_hash), key_hash(key))


class ShareRateLimiter:
    """At most `limit` shares per client per `window_s` seconds (a sliding window), in this process."""

    def __init__(self, limit: Optional[int] = None, window_s: Optional[float] = None):
        self.limit = SHARE_LIMIT if limit is None else limit
        self.window_s = SHARE_WINDOW_S if window_s is None else window_s
        self._seen: "OrderedDict[str, list]" = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: Optional[str]) -> None:
        """Count one share for `client`, or raise LimitReached (and count nothing)."""
        if self.limit <= 0:
            return
        client = client or "unknown"
        now = time.monotonic()
        with self._lock:
            times = [t for t in self._seen.pop(client, []) if now - t < self.window_s]
            if len(times) >= self.limit:
                self._seen[client] = times
                wait = times[0] + self.window_s - now
                raise LimitReached(rate_message(self.limit, self.window_s, wait), limit="rate", retry_after=wait)
            times.append(now)
            self._seen[client] = times
            while len(self._seen) > MAX_CLIENTS:
                self._seen.popitem(last=False)


def rate_message(limit: int, window_s: float, wait_s: float) -> str:
    return (f"too many shares from your address: at most {limit} every {_span(window_s)}; nothing was saved. "
            f"Try again in {_span(max(1.0, wait_s))}")


def _span(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds // 60} minutes"
    if seconds >= 120:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s" if seconds != 1 else "1 second"


def new_document_id() -> str:
    return secrets.token_urlsafe(16)  # 128 bits: not guessable, safe in a URL


def check_document(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("the document is empty; there is nothing to share")
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise LimitReached(f"the document is larger than {MAX_DOCUMENT_BYTES // 1000} kB and cannot be shared",
                           limit="size")
    return text


def check_id(doc_id: str) -> str:
    if not isinstance(doc_id, str) or not _ID.match(doc_id):
        raise BadRequest("that is not a valid document link")
    return doc_id


class FileDocumentStore:
    """The embedded mode's store: one JSON file per document in a folder, bounded in total size."""

    def __init__(self, folder: Optional[str] = None, ttl_s: int = DOCUMENT_TTL_S, max_bytes: Optional[int] = None,
                 limiter: Optional[ShareRateLimiter] = None):
        self.folder = Path(folder or DEFAULT_FOLDER).expanduser()
        self.ttl_s = ttl_s
        self.max_bytes = MAX_TOTAL_BYTES if max_bytes is None else max_bytes
        self.limiter = limiter or ShareRateLimiter()
        self._lock = threading.Lock()
        self._total: Optional[int] = None   # bytes on disk, known after the first sweep
        self._swept_at = -1e18

    @staticmethod
    def _on_disk(size: int) -> int:
        return max(BLOCK, -(-size // BLOCK) * BLOCK)

    def sweep(self, budget_s: float = SWEEP_BUDGET_S) -> int:
        """Remove expired documents (expiry = the file's time + the TTL) and recount the total;
        stops after `budget_s` (the rest waits for the next sweep). Returns how many were removed."""
        removed, total, now = 0, 0, time.time()
        deadline = time.monotonic() + budget_s
        complete = True
        try:
            entries = os.scandir(self.folder)
        except FileNotFoundError:
            self._total, self._swept_at = 0, time.monotonic()
            return 0
        with entries:
            for entry in entries:
                if time.monotonic() > deadline:
                    complete = False
                    break
                if not entry.name.endswith(".json"):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if st.st_mtime + self.ttl_s < now:
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
                    continue
                total += self._on_disk(st.st_size)
        if complete or self._total is None:
            # an incomplete first sweep undercounts: it is completed on the next save
            self._total = total
        elif removed:
            self._total = max(0, self._total - removed * BLOCK)
        self._swept_at = time.monotonic() if complete else self._swept_at
        return removed

    def total_bytes(self) -> int:
        with self._lock:
            if self._total is None:
                self.sweep(budget_s=3600)
            return self._total

    def save(self, text: str, client: Optional[str] = None) -> tuple[str, str]:
        """(id, delete key): the id reads the document; the key, kept by its author, deletes it."""
        check_document(text)
        key = new_delete_key()
        data = json.dumps({"text": text, "expires": time.time() + self.ttl_s, "delete_key_sha256": key_hash(key)},
                          ensure_ascii=False).encode("utf-8", errors="surrogatepass")
        size = self._on_disk(len(data))
        with self._lock:
            if self._total is None or time.monotonic() - self._swept_at > SWEEP_EVERY_S:
                self.sweep()
            if self._total + size > self.max_bytes:
                self.sweep()  # expired ones may make room
                if self._total + size > self.max_bytes:
                    raise storage_full()
            self.limiter.take(client)
            self.folder.mkdir(parents=True, exist_ok=True)
            doc_id = new_document_id()
            tmp = self.folder / f".{doc_id}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.folder / f"{doc_id}.json")
            self._total += size
        return doc_id, key

    def _payload(self, doc_id: str) -> tuple[Path, dict]:
        path = self.folder / f"{check_id(doc_id)}.json"
        try:
            payload = json.loads(path.read_bytes().decode("utf-8", errors="surrogatepass"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            raise NotFound(GONE) from None
        if payload.get("expires", 0) < time.time():
            self._remove(path)
            raise NotFound(GONE)
        return path, payload

    def load(self, doc_id: str) -> str:
        return self._payload(doc_id)[1]["text"]

    def _remove(self, path: Path) -> bool:
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            if self._total is not None:
                self._total = max(0, self._total - self._on_disk(size))
            return True

    def delete(self, doc_id: str, delete_key: Optional[str]) -> None:
        """Only with the document's delete key: Forbidden otherwise, and NotFound when there is none."""
        path, payload = self._payload(doc_id)
        if not key_matches(payload.get("delete_key_sha256"), delete_key):
            raise Forbidden(NOT_YOURS)
        if not self._remove(path):
            raise NotFound(GONE)


# Redis: KEYS = doc key, expiry zset, size hash, byte counter, rate key, delete-key hash key. ARGV = id,
# text, ttl, now, bound, rate limit, rate window, cleanup batch, doc prefix, key hash, key prefix.
# Returns {status, detail}: 1 saved; 0 full; -1 rate.
_SAVE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[8]))
for _, id in ipairs(expired) do
  local size = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('DEL', ARGV[9] .. id)
  redis.call('DEL', ARGV[11] .. id)
  if size > 0 then redis.call('DECRBY', KEYS[4], size) end
end
local size = string.len(ARGV[2])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
if total + size > tonumber(ARGV[5]) then return {0, total} end
local limit = tonumber(ARGV[6])
if limit > 0 then
  local used = tonumber(redis.call('GET', KEYS[5]) or '0')
  if used >= limit then return {-1, redis.call('PTTL', KEYS[5])} end
  redis.call('INCR', KEYS[5])
  if used == 0 then redis.call('PEXPIRE', KEYS[5], math.floor(tonumber(ARGV[7]) * 1000)) end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
redis.call('SET', KEYS[6], ARGV[10], 'EX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('INCRBY', KEYS[4], size)
return {1, total + size}
"""

# KEYS = doc key, expiry zset, size hash, byte counter, delete-key hash key. ARGV = id, hash of the key
# given. Returns 1 deleted, 0 none, -1 not its key (nothing deleted).
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local stored = redis.call('GET', KEYS[5])
if (not stored) or stored ~= ARGV[2] then return -1 end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[5])
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if size > 0 then redis.call('DECRBY', KEYS[4], size) end
return existed
"""


class RedisDocumentStore:
    """The distributed mode's store: documents in Redis with an expiry, shared by every app replica,
    with their own accounting (`wwt:docs:*`) and a per-client share rate (`wwt:share:rate:<client>`)."""

    prefix = "wwt:doc:"
    expiry_key = "wwt:docs:expiry"
    sizes_key = "wwt:docs:sizes"
    bytes_key = "wwt:docs:bytes"
    rate_prefix = "wwt:share:rate:"
    key_prefix = "wwt:dockey:"  # the hash of a document's delete key, with the document's expiry

    def __init__(self, client, ttl_s: int = DOCUMENT_TTL_S, max_bytes: Optional[int] = None,
                 limit: Optional[int] = None, window_s: Optional[float] = None):
        self.client = client
        self.ttl_s = ttl_s
        self.max_bytes = MAX_TOTAL_BYTES if max_bytes is None else max_bytes
        self.limit = SHARE_LIMIT if limit is None else limit
        self.window_s = SHARE_WINDOW_S if window_s is None else window_s
        self._save = client.register_script(_SAVE)
        self._delete = client.register_script(_DELETE)

    def save(self, text: str, client: Optional[str] = None) -> tuple[str, str]:
        """(id, delete key): the id reads the document; the key, kept by its author, deletes it."""
        check_document(text)
        doc_id, key = new_document_id(), new_delete_key()
        data = text.encode("utf-8", errors="surrogatepass")
        keys = [self.prefix + doc_id, self.expiry_key, self.sizes_key, self.bytes_key,
                self.rate_prefix + (client or "unknown")[:200], self.key_prefix + doc_id]
        try:
            status, detail = self._save(keys=keys, args=[doc_id, data, int(self.ttl_s), time.time(), self.max_bytes,
                                                         self.limit, self.window_s, 100, self.prefix, key_hash(key),
                                                         self.key_prefix])
        except Exception as e:
            raise BackendUnavailable("cannot reach Redis to save the document; try again in a moment", f"cannot reach Redis to save the document: {e}") from None
        if status == 0:
            raise storage_full()
        if status == -1:
            wait = max(0, int(detail)) / 1000
            raise LimitReached(rate_message(self.limit, self.window_s, wait), limit="rate", retry_after=wait)
        return doc_id, key

    def load(self, doc_id: str) -> str:
        try:
            data = self.client.get(self.prefix + check_id(doc_id))
        except BadRequest:
            raise
        except Exception as e:
            raise BackendUnavailable("cannot reach Redis to load the document; try again in a moment", f"cannot reach Redis to load the document: {e}") from None
        if data is None:
            raise NotFound(GONE)
        return data.decode("utf-8", errors="surrogatepass") if isinstance(data, bytes) else data

    def delete(self, doc_id: str, delete_key: Optional[str]) -> None:
        """Only with the document's delete key: Forbidden otherwise, and NotFound when there is none."""
        key = self.prefix + check_id(doc_id)
        given = key_hash(delete_key) if isinstance(delete_key, str) and 0 < len(delete_key) <= 200 else "-"
        try:
            existed = self._delete(keys=[key, self.expiry_key, self.sizes_key, self.bytes_key,
                                         self.key_prefix + doc_id], args=[doc_id, given])
        except Exception as e:
            raise BackendUnavailable("cannot reach Redis to delete the document; try again in a moment", f"cannot reach Redis to delete the document: {e}") from None
        if existed == -1:
            raise Forbidden(NOT_YOURS)
        if not existed:
            raise NotFound(GONE)

    def total_bytes(self) -> int:
        return int(self.client.get(self.bytes_key) or 0)
