"""Which worker a document's keystrokes go to, so its prefix stays in one worker's KV cache.

Every worker of a model consumes two queues: the model's shared queue (any worker) and a
queue of its own (`node_queue`). A completion is routed by its document: the start of its
text, which stays the same while a person types on (the prompt window only ever moves
forward in whole steps, `model.contract.stable_tail`). Rendezvous hashing of that key over
the live workers picks the worker; when a worker joins or leaves, only the documents that
hash to it move. A worker whose own queue already has a backlog is skipped for the shared
queue, so one hot document cannot stall behind a busy worker while another sits idle.
"""

from __future__ import annotations

import hashlib
from typing import Optional

from .config import queue_name

KEY_CHARS = 64  # the start of the text that names a document


def node_queue(model: str, node: str) -> str:
    """The queue only `node` consumes for `model` (a short hash keeps odd node names out of it)."""
    digest = hashlib.sha1(node.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{queue_name(model)}.node-{digest}"


def document_key(text: str) -> str:
    """What names a document for routing: the start of its text."""
    return text[:KEY_CHARS]


def _weight(key: str, node: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{node}\x00{key}".encode("utf-8", "surrogatepass")).digest()[:8], "big")


def choose(key: str, workers: list[dict]) -> Optional[dict]:
    """The worker (an announcement from the heartbeat registry) that owns `key`; None if none can
    take routed work (no worker, or none announcing a queue of its own)."""
    candidates = [w for w in workers if w.get("queue") and w.get("node")]
    if not candidates:
        return None
    return max(candidates, key=lambda w: _weight(key, str(w["node"])))
BACKLOG = 4  # routed tasks already waiting for a worker past which a new one goes to the shared queue
