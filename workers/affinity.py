"""Which worker a document's keystrokes go to, so its prefix stays in one worker's KV cache.

Every worker of a model consumes two queues: the model's shared queue (any worker) and a
queue of its own (`node_queue`). A completion is routed by its document: the start of its
text, which stays the same while a person types on (the prompt window only ever moves
forward in whole steps, `model.contract.stable_tail`).

A document seen for the first time goes to the live worker that holds the fewest documents
typed in the last ROUTE_TTL_S (ties broken by rendezvous hashing), and the choice is kept in
Redis, so every app process sends it to the same worker and a handful of writers spread
evenly instead of by the luck of a hash. When its worker leaves, the document is placed
again the same way. A worker whose own queue already has a backlog is skipped for the
shared queue, so one busy worker never makes a document wait while another sits idle.
"""

from __future__ import annotations

import hashlib
import time
from typing import Optional

from .queues import queue_name

KEY_CHARS = 32  # the start of the text that names a document: documents that share it share a worker (and
# their first tokens); a text shorter than this moves as it grows, while its prefix is cheap to prefill


def node_queue(model: str, node: str) -> str:
    """The queue only `node` consumes for `model` (a short hash keeps odd node names out of it)."""
    digest = hashlib.sha1(node.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{queue_name(model)}.node-{digest}"


def document_key(text: str) -> str:
    """What names a document for routing: the start of its text."""
    return text[:KEY_CHARS]


def _weight(key: str, node: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{node}\x00{key}".encode("utf-8", "surrogatepass")).digest()[:8], "big")


def choose(key: str, workers: list[dict], held: Optional[dict] = None) -> Optional[dict]:
    """The worker (an announcement from the heartbeat registry) for a new document `key`: the one
    holding the fewest documents (`held`: node -> count), ties by rendezvous hashing; None if no
    worker can take routed work (none, or none announcing a queue of its own)."""
    candidates = [w for w in workers if w.get("queue") and w.get("node")]
    if not candidates:
        return None
    held = held or {}
    return min(candidates, key=lambda w: (held.get(str(w["node"]), 0), -_weight(key, str(w["node"]))))


ROUTE_PREFIX = "wwt:route:"       # wwt:route:<model>:<document> -> the node it goes to
DOCUMENTS_PREFIX = "wwt:routed:"  # wwt:routed:<model>:<node> -> sorted set of documents by last use
ROUTE_TTL_S = 600                 # a document not typed in for this long is placed afresh


def route(client, model: str, text: str, workers: list[dict]) -> Optional[dict]:
    """The worker that owns the document `text` belongs to (placing it if it is new or its worker
    left), or None when no worker takes routed work. Three Redis round trips for a known document."""
    live = {str(w["node"]): w for w in workers if w.get("queue") and w.get("node")}
    if not live:
        return None
    key = document_key(text)
    document = hashlib.sha1(f"{model}\x00{key}".encode("utf-8", "surrogatepass")).hexdigest()[:20]
    route_key = f"{ROUTE_PREFIX}{model}:{document}"
    now = time.time()
    node = client.get(route_key)
    node = node.decode() if isinstance(node, bytes) else node
    if node not in live:
        pipe = client.pipeline(transaction=False)
        for n in live:
            pipe.zcount(f"{DOCUMENTS_PREFIX}{model}:{n}", now - ROUTE_TTL_S, "+inf")
        held = dict(zip(live, (int(c) for c in pipe.execute())))
        node = str(choose(key, list(live.values()), held)["node"])
        client.set(route_key, node, ex=ROUTE_TTL_S)
    documents = f"{DOCUMENTS_PREFIX}{model}:{node}"
    pipe = client.pipeline(transaction=False)
    pipe.expire(route_key, ROUTE_TTL_S)
    pipe.zadd(documents, {document: now})
    pipe.zremrangebyscore(documents, "-inf", now - ROUTE_TTL_S)
    pipe.expire(documents, ROUTE_TTL_S)
    pipe.execute()
    return live[node]


BACKLOG = 4  # routed tasks already waiting for a worker past which a new one goes to the shared queue

QUEUES_PREFIX = "wwt:queues:"  # wwt:queues:<model> -> sorted set of workers' own queues by last announcement
ORPHAN_AFTER_S = 600           # a worker's own queue unannounced this long is deleted, messages and all


def drop_orphaned_queues(client, model: str, queue: str) -> None:
    """Note that `queue` (this worker's own) is alive; delete the own queues of workers that stopped
    announcing ORPHAN_AFTER_S ago. A task a dead worker had taken is restored by the broker to that
    worker's own queue, where nobody reads it: the app has sent it again by then, so it only
    takes memory. Run at every heartbeat, so some live worker of the model sweeps."""
    key = QUEUES_PREFIX + model
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zadd(key, {queue: now})
    pipe.zrangebyscore(key, "-inf", now - ORPHAN_AFTER_S)
    orphans = pipe.execute()[1]
    if orphans:
        pipe = client.pipeline(transaction=False)
        pipe.delete(*orphans)
        pipe.zrem(key, *orphans)
        pipe.execute()

