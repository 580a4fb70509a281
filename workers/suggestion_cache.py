"""The suggestion cache in Redis, shared by every app replica.

Exact hits: the same text with the same model and settings is answered without a worker.
Incremental hits: when the new text is an earlier text plus characters that match the start
of a suggestion given for it (the person is typing along a suggestion), the rest of that
suggestion comes back at once.

Keys: `wwt:sc:<settings digest>:<text digest>`, where the settings digest covers the model
and every setting that changes the answer (CompletionRequest.settings_key()). Entries expire
(TTL) and their number is bounded: a sorted set indexes them by last use and the least
recently used are deleted beyond the bound, whatever Redis's own maxmemory policy is.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Optional

from model.contract import suggestion_key
from model.types import Completion, CompletionRequest, Suggestion, Timings

PREFIX = "wwt:sc:"
INDEX_KEY = "wwt:sc:index"   # sorted set: entry key -> last use (unix seconds)
STATS_KEY = "wwt:sc:stats"   # hash: hits, incremental_hits, misses, stores, evictions
UNCACHEABLE = {"time", "cancelled"}  # cut short by load, not by the text: do not replay them


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class SuggestionCache:
    def __init__(self, client, ttl_s: Optional[float] = None, max_entries: Optional[int] = None,
                 max_typed_chars: int = 256, max_entry_bytes: int = 64_000):
        self.client = client
        # The registry's defaults (WWT_CACHE_TTL_S, WWT_CACHE_MAX_ENTRIES); the app passes the configured values.
        self.ttl_s = int(ttl_s if ttl_s is not None else 3600)
        self.max_entries = int(max_entries if max_entries is not None else 20000)
        self.max_typed_chars = max_typed_chars  # how far back an earlier text may end
        self.max_entry_bytes = max_entry_bytes

    # -- keys ---------------------------------------------------------------------------
    @staticmethod
    def settings_digest(request: CompletionRequest) -> str:
        settings = json.dumps(request.settings_key(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(settings.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def key(self, request: CompletionRequest, text: Optional[str] = None) -> str:
        text = request.text if text is None else text
        return f"{PREFIX}{self.settings_digest(request)}:{hashlib.sha256(_encode(text)).hexdigest()}"

    def candidate_keys(self, request: CompletionRequest) -> list[str]:
        """Keys of the text and of each earlier text it extends, longest first.

        One SHA-256 pass over the document: the hash state is copied at each of the last
        `max_typed_chars` character boundaries (UTF-8 encodes character by character).
        """
        text = request.text
        first = len(text) - min(len(text), self.max_typed_chars)
        h = hashlib.sha256(_encode(text[:first]))
        digests = [h.copy().hexdigest()]
        for ch in text[first:]:
            h.update(_encode(ch))
            digests.append(h.copy().hexdigest())
        prefix = f"{PREFIX}{self.settings_digest(request)}:"
        return [prefix + d for d in reversed(digests)]  # [0] is the whole text, [k] drops k chars

    # -- read ---------------------------------------------------------------------------
    def lookup(self, request: CompletionRequest) -> Optional[Completion]:
        """A cached Completion (timings.source "cache" or "cache-incremental"), or None."""
        started = time.perf_counter()
        keys = self.candidate_keys(request)
        values = self.client.mget(keys)
        for typed_len, (key, value) in enumerate(zip(keys, values)):
            if value is None:
                continue
            try:
                cached = Completion.from_dict(json.loads(value))
            except (ValueError, TypeError, AttributeError):
                continue
            if typed_len == 0:
                result, field = cached, "hits"
                result.timings = Timings(source="cache")
            else:
                result = self._rest(cached, request.text[len(request.text) - typed_len:])
                if result is None:
                    continue
                field = "incremental_hits"
            self._touch(key, field)
            result.timings.total_ms = (time.perf_counter() - started) * 1000
            return result
        self.client.hincrby(STATS_KEY, "misses", 1)
        return None

    @staticmethod
    def _rest(cached: Completion, typed: str) -> Optional[Completion]:
        """The remainders of the suggestions that start with the typed characters, if any."""
        rest, seen = [], set()
        for s in cached.suggestions:
            key = suggestion_key(s.text[len(typed):])
            if s.text.startswith(typed) and key and key not in seen:
                seen.add(key)
                # Token ids and log-probabilities are per token; the typed characters may end
                # inside a token, so a remainder does not carry them.
                rest.append(Suggestion(text=s.text[len(typed):], finish_reason=s.finish_reason))
        if not rest:
            return None
        return Completion(model=cached.model, suggestions=rest, timings=Timings(source="cache-incremental"))

    def _touch(self, key: str, field: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.expire(key, self.ttl_s)
        pipe.zadd(INDEX_KEY, {key: time.time()})
        pipe.hincrby(STATS_KEY, field, 1)
        pipe.execute()

    # -- write --------------------------------------------------------------------------
    def store(self, request: CompletionRequest, completion: Completion) -> bool:
        """Remember a worker's answer; returns False when it is not worth replaying."""
        if not completion.suggestions or any(s.finish_reason in UNCACHEABLE for s in completion.suggestions):
            return False
        data = completion.to_dict()
        data["timings"] = Timings().to_dict()
        payload = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if len(payload) > self.max_entry_bytes:
            return False
        key, now = self.key(request), time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key, payload, ex=self.ttl_s)
        pipe.zadd(INDEX_KEY, {key: now})
        pipe.zremrangebyscore(INDEX_KEY, "-inf", now - self.ttl_s)  # expired already: drop from the index
        pipe.hincrby(STATS_KEY, "stores", 1)
        pipe.zcard(INDEX_KEY)
        size = pipe.execute()[-1]
        if size > self.max_entries:
            self._evict(size - self.max_entries)
        return True

    def _evict(self, count: int) -> None:
        oldest = self.client.zpopmin(INDEX_KEY, count)
        if oldest:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*[k for k, _ in oldest])
            pipe.hincrby(STATS_KEY, "evictions", len(oldest))
            pipe.execute()

    # -- observe ------------------------------------------------------------------------
    def stats(self) -> dict:
        raw = self.client.hgetall(STATS_KEY)
        out = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
        for name in ("hits", "incremental_hits", "misses", "stores", "evictions"):
            out.setdefault(name, 0)
        out["entries"] = int(self.client.zcard(INDEX_KEY))
        return out

    def clear(self) -> None:
        """Forget every cached suggestion (counters too)."""
        keys = [k for k, _ in self.client.zrange(INDEX_KEY, 0, -1, withscores=True)]
        pipe = self.client.pipeline(transaction=True)
        if keys:
            pipe.delete(*keys)
        pipe.delete(INDEX_KEY, STATS_KEY)
        pipe.execute()
