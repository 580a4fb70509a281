"""Scaling out without losing prefix reuse, and bounded waiting in the distributed mode: a real
redis-server, real `wwt worker` processes and the CeleryBackend."""

from __future__ import annotations

import threading
import time

import pytest

from app.backends.celery import CeleryBackend, _Watch
from model.errors import Busy, WorkerFailed
from model.network.tiny import make_tiny_model
from model.types import CompletionRequest
from workers import affinity
from workers.queues import queue_name
from workers.registry import announce, record_holder

from dist_support import Worker, wait_for, worker_stats

pytestmark = pytest.mark.redis

FAST_ENV = {"WWT_HEARTBEAT_S": "1"}  # announcements expire within 3 s of a worker's death
FAILOVER_BOUND_S = 15  # a liveness bound, generous: not a speed claim

DOCUMENT = ("The harbour was quiet in the early morning, and the fishing boats rocked gently "
            "against the pier while the gulls waited on the posts for the first catch of the day.")


@pytest.fixture(scope="module")
def client(redis_server):
    return redis_server.client()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("doc"), "gpt2", seed=4, n_positions=256, n_embd=64,
                           n_layer=2, n_head=2)


def _start(redis_server, client, model_dir, logs, names, env=FAST_ENV, concurrency=2, model="doc"):
    workers = [Worker(f"{model}={model_dir}", redis_server.url, logs, concurrency=concurrency, env=env,
                      name=n).start() for n in names]
    for w in workers:
        w.wait_announced(client)
    return workers


def _keystroke(text: str, seed: int) -> CompletionRequest:
    return CompletionRequest(text=text, model="doc", n=2, max_new_tokens=4, stop=None, seed=seed, fresh=True)


def test_routing_is_stable_and_moves_only_the_documents_of_a_worker_that_left():
    workers = [{"node": f"n{i}", "queue": f"q{i}"} for i in range(3)]
    keys = [f"document {i}" for i in range(300)]
    before = {k: affinity.choose(k, workers)["node"] for k in keys}
    assert before == {k: affinity.choose(k, list(reversed(workers)))["node"] for k in keys}  # order-free
    assert set(before.values()) == {"n0", "n1", "n2"}
    after = {k: affinity.choose(k, workers[:2])["node"] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "n2")
    # The document key is the start of the text: typing on at the end does not move a document.
    assert affinity.document_key(DOCUMENT) == affinity.document_key(DOCUMENT + " And then")
    assert affinity.choose("x", [{"node": "old"}]) is None  # a worker from before queues of its own
    # A new document goes to the worker holding the fewest documents, whatever the hash says.
    for key in keys[:20]:
        assert affinity.choose(key, workers, {"n0": 5, "n1": 2, "n2": 3})["node"] == "n1"


def test_new_documents_spread_evenly_and_stay_where_they_were_placed(client):
    workers = [{"node": f"spread{i}", "queue": f"q{i}"} for i in range(3)]
    def place(suffix, among):
        return [affinity.route(client, "spread", f"Document {i} begins here, and it is long{suffix}",
                               among)["node"] for i in range(12)]

    placed = place("", workers)
    assert sorted(placed.count(w["node"]) for w in workers) == [4, 4, 4]
    assert place(" and goes on", workers) == placed  # typing on keeps the document where it is
    moved = place("", workers[:2])
    assert all(m == p for m, p in zip(moved, placed) if p != "spread2")  # only the leaver's documents move
    assert sorted(moved.count(w["node"]) for w in workers[:2]) == [6, 6]


def test_keystrokes_of_a_document_stay_on_its_worker_and_reuse_its_prefix(redis_server, client, model_dir,
                                                                          tmp_path):
    workers = _start(redis_server, client, model_dir, tmp_path, ["aff0", "aff1"])
    backend = CeleryBackend(["doc"], redis_url=redis_server.url, timeout=60)
    try:
        owners = []
        for letter in range(4):  # four documents, typed one after the other
            opening = f"Letter {letter}: {DOCUMENT}"
            served, reused = [], []
            for step in range(8):  # the person types on, a word at a time
                got = backend.complete(_keystroke(opening + " and then" * step, step), timeout=60)
                served.append(got.timings.worker)
                reused.append(got.timings.tokens_reused)
            assert len(set(served)) == 1, served
            assert all(r > 0 for r in reused[1:]), reused  # every later keystroke prefills only what is new
            owners.append(served[0])
            # Through the API too: a request with no editor behind it routes the same way.
            got = backend.complete(_keystroke(opening + " and then" * 8, 99), timeout=60)
            assert got.timings.worker == served[0] and got.timings.tokens_reused > 0
        # New documents go to the worker holding fewer: two each.
        assert sorted(owners.count(w.node()) for w in workers) == [2, 2], owners
    finally:
        backend.close()
        for w in workers:
            w.stop()


def test_a_documents_keystrokes_move_to_another_worker_when_its_worker_is_killed(redis_server, client,
                                                                              model_dir, tmp_path):
    workers = _start(redis_server, client, model_dir, tmp_path, ["kill0", "kill1"])
    backend = CeleryBackend(["doc"], redis_url=redis_server.url, timeout=60)
    by_node = {w.node(): w for w in workers}
    try:
        text = f"Letter 9: {DOCUMENT}"
        victim = backend.complete(_keystroke(text, 1), timeout=60).timings.worker
        assert backend.complete(_keystroke(text + " so", 4), timeout=60).timings.worker == victim
        by_node[victim].kill()  # SIGKILL: no goodbye, its announcement lives on until it expires
        killed = time.monotonic()
        got = backend.complete(_keystroke(text + " and", 2), timeout=60)
        assert time.monotonic() - killed < FAILOVER_BOUND_S
        survivor = next(n for n in by_node if n != victim)
        assert got.timings.worker == survivor and got.suggestions
        # The message left in the dead worker's own queue expires with it.
        own = affinity.node_queue("doc", victim)
        assert client.exists(own) == 0 or client.ttl(own) > 0
        # Later keystrokes stay on the survivor and reuse the prefix there.
        again = backend.complete(_keystroke(text + " and then", 3), timeout=60)
        assert again.timings.worker == survivor and again.timings.tokens_reused > 0
    finally:
        backend.close()
        for w in workers:
            w.stop()


def test_a_task_on_the_shared_queue_whose_worker_died_fails_with_the_reason(redis_server, client):
    """Announcements and the holder record written by hand: the wait's liveness check alone."""
    backend = CeleryBackend(["ghost"], redis_url=redis_server.url, timeout=60)
    try:
        announce(client, "ghost", "alive@host", {"queue": "q-alive"}, ttl=30)
        record_holder(client, "task-1", "dead@host", redeliver_s=100, ttl=30)
        with pytest.raises(WorkerFailed, match="stopped .it may have crashed. while answering"):
            backend._check_alive(_Watch("ghost", "task-1", time.monotonic() + 20))
        resent = []
        watch = _Watch("ghost", "task-2", time.monotonic() + 20, routed="dead@host", resend=lambda: resent.append(1))
        record_holder(client, "task-2", "dead@host", redeliver_s=100, ttl=30)
        backend._check_alive(watch)  # routed to a dead worker: sent again to the shared queue, no error
        assert resent == [1] and watch.routed is None
        backend._check_alive(watch)  # the dead worker's stale record no longer counts
        assert resent == [1]
    finally:
        client.delete("wwt:serving:ghost")
        backend.close()


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("slow"), "gpt2", seed=3, n_positions=512, n_embd=256,
                           n_layer=8, n_head=8)


def _long(seed: int, text: str = "Once upon a time") -> CompletionRequest:
    return CompletionRequest(text=text, model="slowq", n=10, max_new_tokens=256, stop=None, seed=seed,
                             fresh=True)


def test_waiting_is_bounded_per_model_and_per_client(redis_server, client, slow_model, tmp_path, monkeypatch):
    workers = _start(redis_server, client, slow_model, tmp_path, ["busy0"], concurrency=1, model="slowq",
                     env={**FAST_ENV, "WWT_TASK_SOFT_TIME_LIMIT": "3", "WWT_TASK_TIME_LIMIT": "5"})
    backend = CeleryBackend(["slowq"], redis_url=redis_server.url, timeout=60, max_waiting=2, max_waiting_per_client=1)
    results, threads = {}, []

    def call(key, request, client_id):
        try:
            results[key] = backend.complete(request, timeout=60, client=client_id)
        except Exception as e:  # shown by the assertions
            results[key] = e

    try:
        node = workers[0].node()
        started = worker_stats(client, node).get("started", 0)
        threads.append(threading.Thread(target=call, args=("running", _long(1), "10.0.0.1")))
        threads[-1].start()
        wait_for(lambda: worker_stats(client, node).get("started", 0) > started, 30, "the worker to take a task",
                 every=0.01)
        # One client: its second request is refused at once; another client is not held by it.
        t0 = time.monotonic()
        with pytest.raises(Busy, match="of your requests are already waiting"):
            backend.complete(_long(2), timeout=60, client="10.0.0.1")
        assert time.monotonic() - t0 < 2
        for i in range(2):  # two more wait in the model's queues (the worker runs one at a time)
            threads.append(threading.Thread(target=call, args=(f"queued{i}", _long(3 + i, f"Story {i} "),
                                                                 f"10.0.1.{i}")))
            threads[-1].start()
        queues = [queue_name("slowq"), affinity.node_queue("slowq", node)]
        wait_for(lambda: sum(client.llen(q) for q in queues) >= 2, 30, "two tasks waiting in the queues",
                 every=0.01)
        t0 = time.monotonic()
        with pytest.raises(Busy, match="2 requests are waiting for slowq"):
            backend.complete(_long(9, "A third story"), timeout=60, client="10.0.2.1")
        assert time.monotonic() - t0 < 2
        for t in threads:
            t.join(90)
        assert all(not isinstance(r, Exception) for r in results.values()), results
        assert client.ttl(queue_name("slowq")) > 0 or not client.exists(queue_name("slowq"))
    finally:
        for t in threads:
            t.join(1)
        backend.close()
        for w in workers:
            w.stop()


def test_the_load_generators_run_and_report(tmp_path):
    """`wwt loadtest` both ways, briefly: the figures are printed (their values are measured, never
    asserted), every request is accounted for, and the command exits 0."""
    import re
    import subprocess
    import sys

    from dist_support import ROOT

    scaleout = subprocess.run([sys.executable, "-m", "app.cli", "loadtest", "--workers", "1", "--writers", "2",
                               "--interval", "0.5", "--seconds", "2"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert scaleout.returncode == 0, scaleout.stderr[-2000:]
    runs = re.findall(r"^1 worker, (routed by document|no routing): sent (\d+), answered (\d+), busy 0, errors 0; "
                      r"prefix reuse [\d.]+% of prompt tokens", scaleout.stdout, re.M)
    assert [r[0] for r in runs] == ["routed by document", "no routing"], scaleout.stdout
    assert all(sent == answered and int(sent) > 0 for _, sent, answered in runs), runs

    load = subprocess.run([sys.executable, "-m", "app.cli", "loadtest", "--rates", "2", "--seconds", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr[-2000:]
    found = re.search(r"^2 req/s for 2 s: sent 4, answered (\d+) .*refused (\d+) .*errors (\d+); RSS (\d+) -> (\d+) MB",
                      load.stdout, re.M)
    assert found, load.stdout
    answered, refused, errors = (int(found.group(i)) for i in (1, 2, 3))
    assert answered + refused + errors == 4 and errors == 0


def test_a_dead_workers_own_queue_is_deleted_by_a_live_workers_heartbeat(client):
    from workers.registry import Heartbeat

    dead, alive = affinity.node_queue("orph", "dead@host"), affinity.node_queue("orph", "alive@host")
    client.rpush(dead, "a task restored after its worker died")
    client.zadd(affinity.QUEUES_PREFIX + "orph", {dead: time.time() - affinity.ORPHAN_AFTER_S - 1})
    Heartbeat(client, "orph", "alive@host", {"queue": alive}, interval=1, ttl=3).beat()
    assert not client.exists(dead)
    assert client.zscore(affinity.QUEUES_PREFIX + "orph", dead) is None
    assert client.zscore(affinity.QUEUES_PREFIX + "orph", alive) is not None  # its own is kept
