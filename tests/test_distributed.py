"""The distributed path end to end: a real redis-server (with a password), real `wwt worker`
processes (Celery, threads pool) and the CeleryBackend, with tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from app.backends.celery import CeleryBackend
from model.errors import Cancelled, BackendUnavailable, BadRequest, Forbidden, NoWorker, NotFound, UnknownModel
from model.network.tiny import make_tiny_model
from model.types import AnswerRequest, ClassifyRequest, Completion, CompletionRequest, Suggestion
from workers.queues import QueueConfig, QueueMisconfigured, queue_name, redact
from workers.registry import live_workers
from workers.suggestion_cache import SuggestionCache

from dist_support import ROOT, Worker, total_tasks, wait_for, worker_stats

pytestmark = pytest.mark.redis

FAST_ENV = {"WWT_HEARTBEAT_S": "1"}  # announcements expire within 3 s of a worker's death
# The slow pair: decoding is cut at 1.5 s (soft limit), tasks of a dead worker are redelivered
# after 5 s and swept for every 0.5 s, so a SIGKILLed task is finished elsewhere within seconds.
SLOW_ENV = {**FAST_ENV, "WWT_TASK_SOFT_TIME_LIMIT": "1.5", "WWT_TASK_TIME_LIMIT": "3.5",
            "WWT_VISIBILITY_TIMEOUT": "5", "WWT_RESTORE_INTERVAL": "0.5"}


@pytest.fixture(scope="module")
def client(redis_server):
    return redis_server.client()


def two_workers(name: str, folder, redis_server, client, logs, concurrency: int, env: dict):
    """Start two workers serving `name` from `folder` on one queue; yield them once both are
    announced, stop them after."""
    workers = [Worker(f"{name}={folder}", redis_server.url, logs, concurrency=concurrency, env=env,
                      name=f"{name}{i}").start() for i in range(2)]
    try:
        for w in workers:
            w.wait_announced(client)
        yield workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def pair(redis_server, client, tiny_gpt2_heads, tmp_path_factory):
    """Two workers on one queue serving `tiny` (LM + classification + QA heads)."""
    yield from two_workers("tiny", tiny_gpt2_heads, redis_server, client, tmp_path_factory.mktemp("worker-logs"),
                           concurrency=2, env=FAST_ENV)


@pytest.fixture(scope="module")
def backend(redis_server, pair):
    b = CeleryBackend(["tiny"], redis_url=redis_server.url, timeout=60)
    yield b
    b.close()


@pytest.fixture(scope="module")
def local_engine(tiny_gpt2_heads):
    from model import Engine

    engine = Engine.from_pretrained(f"tiny={tiny_gpt2_heads}", device="cpu")
    yield engine
    engine.close()


def _req(text, **kw):
    return CompletionRequest(text=text, **{"model": "tiny", "n": 3, "max_new_tokens": 8, "stop": None, **kw})


# -- end to end ------------------------------------------------------------------------------------

def test_complete_classify_answer_through_the_queue(backend, client, local_engine):
    before = total_tasks(client)
    request = _req("The little cat", n=1, greedy=True, fresh=True)
    got = backend.complete(request, timeout=60)
    assert got.model == "tiny" and got.timings.source == "engine"
    assert total_tasks(client) == before + 1
    # The worker answered exactly what the same engine answers in this process.
    want = local_engine.complete(request)
    assert [s.text for s in got.suggestions] == [s.text for s in want.suggestions]
    assert [s.token_ids for s in got.suggestions] == [s.token_ids for s in want.suggestions]
    assert got.timings.total_ms >= got.timings.queue_ms > 0

    c = backend.classify(ClassifyRequest(text="What a lovely day", model="tiny"), timeout=60)
    want_c = local_engine.classify("What a lovely day")
    assert c.method == "head" and [l.label for l in c.labels] == [l.label for l in want_c.labels]
    assert [l.score for l in c.labels] == pytest.approx([l.score for l in want_c.labels], abs=1e-5)

    context = "The cat sat on the mat. It was warm there."
    a = backend.answer(AnswerRequest(question="Where did the cat sit?", context=context, model="tiny"), timeout=60)
    want_a = local_engine.answer("Where did the cat sit?", context)
    assert (a.text, a.start, a.end) == (want_a.text, want_a.start, want_a.end)
    assert context[a.start:a.end] == a.text
    assert total_tasks(client) == before + 3

    info = backend.model_info("tiny")
    assert info["served"] and len(info["workers"]) == 2 and "question-answering" in info["heads"]
    assert backend.model_info("gpt2")["served"] is False


def test_bad_request_comes_back_as_an_error_and_the_worker_keeps_serving(backend, pair):
    with pytest.raises(BadRequest):
        backend.complete(_req("Hello", temperature=-1.0, fresh=True), timeout=60)
    with pytest.raises(BadRequest):
        backend.complete(_req("Hello", n=0, fresh=True), timeout=60)
    with pytest.raises(BadRequest, match="max_time"):
        backend.complete(_req("Hello", max_time=-1.0, fresh=True), timeout=60)
    assert all(w.alive() for w in pair)
    assert backend.complete(_req("Hello there", fresh=True), timeout=60).suggestions


def test_two_workers_on_one_queue_share_the_load(backend, client, pair):
    nodes = [w.node() for w in pair]
    before = {n: worker_stats(client, n).get("done", 0) for n in nodes}

    def one(i):
        return backend.complete(_req(f"Share {i} of the load", n=3, max_new_tokens=24, fresh=True), timeout=60)

    served = {}
    with ThreadPoolExecutor(8) as pool:
        for round_ in range(5):  # normally the first round already reaches both
            results = list(pool.map(one, range(round_ * 8, round_ * 8 + 8)))
            assert all(r.suggestions for r in results)
            served = {n: worker_stats(client, n).get("done", 0) - before[n] for n in nodes}
            if all(served.values()):
                break
    assert all(count > 0 for count in served.values()), served


# -- the suggestion cache ------------------------------------------------------------------------

def test_a_cache_hit_makes_no_worker_call(backend, client):
    request = _req("Cache me if you can", seed=7)
    before, stats = total_tasks(client), backend.cache_stats()
    first = backend.complete(request, timeout=60)
    assert first.timings.source == "engine" and total_tasks(client) == before + 1

    again = backend.complete(request, timeout=60)
    assert again.timings.source == "cache"
    assert [s.text for s in again.suggestions] == [s.text for s in first.suggestions]
    assert total_tasks(client) == before + 1  # no worker was asked
    after = backend.cache_stats()
    assert after["hits"] == stats["hits"] + 1 and after["misses"] == stats["misses"] + 1

    # A setting that changes the answer is another key; asking for fresh samples skips the cache.
    assert backend.complete(_req("Cache me if you can", seed=7, temperature=0.5), timeout=60).timings.source == "engine"
    assert backend.complete(_req("Cache me if you can", seed=7, fresh=True), timeout=60).timings.source == "engine"
    assert total_tasks(client) == before + 3

    info = backend.model_info("tiny")
    assert info["served"] and len(info["workers"]) == 2 and "question-answering" in info["heads"]
    assert backend.model_info("gpt2")["served"] is False


def test_typing_along_a_suggestion_is_served_from_the_cache(backend, client):
    text = "Once upon a time"
    first = backend.complete(_req(text, seed=3), timeout=60)
    target = max(first.suggestions, key=lambda s: len(s.text))
    assert len(target.text) >= 3, first.suggestions
    typed = target.text[:2]
    before = total_tasks(client)

    along = backend.complete(_req(text + typed, seed=3), timeout=60)
    assert along.timings.source == "cache-incremental"
    assert target.text[2:] in [s.text for s in along.suggestions]
    assert all((typed + s.text) in [x.text for x in first.suggestions] for s in along.suggestions)
    assert total_tasks(client) == before

    # Characters that leave every suggestion are a miss, answered by a worker.
    off = backend.complete(_req(text + "\u2603\u2603", seed=3), timeout=60)
    assert off.timings.source == "engine" and total_tasks(client) == before + 1


def _completion(*texts, reason="length"):
    return Completion(model="m", suggestions=[Suggestion(text=t, finish_reason=reason) for t in texts])


def test_cache_keys_carry_every_setting_and_the_cache_is_bounded(client):
    cache = SuggestionCache(client, ttl_s=60, max_entries=3)
    cache.clear()
    base = CompletionRequest(text="abc", model="m")
    keys = {cache.key(base), cache.key(CompletionRequest(text="abc", model="other")),
            cache.key(CompletionRequest(text="abc", model="m", n=2)),
            cache.key(CompletionRequest(text="abc", model="m", top_p=0.5)),
            cache.key(CompletionRequest(text="abc", model="m", stop="auto", seed=1)),
            cache.key(CompletionRequest(text="abd", model="m"))}
    assert len(keys) == 6
    # Neither a time budget nor asking for fresh samples changes what a cached answer is for.
    assert cache.key(CompletionRequest(text="abc", model="m", max_time=1.0, fresh=True)) == cache.key(base)

    assert not cache.store(base, _completion(" x", reason="time"))  # cut short by load: not kept
    for i in range(5):
        assert cache.store(CompletionRequest(text=f"doc {i}", model="m"), _completion(f" next {i}"))
        if i == 2:  # doc 0 used again: the least recently used is now doc 1
            assert cache.lookup(CompletionRequest(text="doc 0", model="m")) is not None
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["evictions"] == 2
    present = [cache.lookup(CompletionRequest(text=f"doc {i}", model="m")) is not None for i in range(5)]
    assert present == [True, False, False, True, True]
    assert client.ttl(cache.key(CompletionRequest(text="doc 4", model="m"))) <= 60
    # Odd Unicode (a lone surrogate, an emoji) keys and extends like any text.
    odd = CompletionRequest(text="x\ud800\U0001F600", model="m")
    assert cache.store(odd, _completion("\U0001F600 yes"))
    hit = cache.lookup(CompletionRequest(text="x\ud800\U0001F600\U0001F600 ", model="m"))
    assert hit is not None and hit.timings.source == "cache-incremental" and hit.suggestions[0].text == "yes"
    cache.clear()


# -- failing fast and clearly --------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_unknown_and_unserved_models_fail_at_once(backend, client):
    before = total_tasks(client)
    with pytest.raises(UnknownModel, match="no-such-model"):
        backend.complete(_req("Hi", model="no-such-model", fresh=True), timeout=300)
    with pytest.raises(NoWorker, match="no worker is serving gpt2-xl"):
        backend.complete(_req("Hi", model="gpt2-xl", fresh=True), timeout=300)
    with pytest.raises(NoWorker):
        backend.classify(ClassifyRequest(text="Hi", model="distilgpt2"), timeout=300)
    assert total_tasks(client) == before
    assert client.llen(queue_name("gpt2-xl")) == 0  # nothing was queued for nobody


def test_shared_documents_live_in_redis(backend, redis_server):
    doc_id, key = backend.save_document("A text to share.\n")
    other = CeleryBackend(["tiny"], redis_url=redis_server.url)  # another app replica
    try:
        assert other.load_document(doc_id) == "A text to share.\n"
        with pytest.raises(Forbidden):
            other.delete_document(doc_id, "not its key")
        other.delete_document(doc_id, key)  # the author's key works on any replica
    finally:
        other.close()
    with pytest.raises(NotFound):
        backend.load_document(doc_id)
    with pytest.raises(BadRequest):
        backend.load_document("x" * 22)


def test_cli_complete_goes_through_a_worker(redis_server, client, pair):
    before = total_tasks(client)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "app.cli", "complete", "--backend", "celery", "--redis-url",
                          redis_server.url, "--model", "tiny", "--json", "--greedy", "--num", "1",
                          "--max-new-tokens", "6", "Through the queue"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["model"] == "tiny" and result["suggestions"] and result["timings"]["source"] == "engine"
    assert total_tasks(client) == before + 1

    # The environment selects the same path; the plain output prints the text and what followed.
    env.update(WWT_BACKEND="celery", WWT_REDIS_URL=redis_server.url)
    out = subprocess.run([sys.executable, "-m", "app.cli", "complete", "--model", "tiny", "--num", "2",
                          "Typed in a shell"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1. Typed in a shell") and "tiny" in out.stderr
    assert total_tasks(client) == before + 2

    out = subprocess.run([sys.executable, "-m", "app.cli", "complete", "--model", "gpt2", "Hi"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no worker is serving gpt2" in out.stderr and "Traceback" not in out.stderr


# -- failures of workers and of Redis --------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A model big enough that a long request takes seconds on the CPU."""
    return make_tiny_model(tmp_path_factory.mktemp("slow"), "gpt2", seed=3, n_positions=512, n_embd=256,
                           n_layer=8, n_head=8)


@pytest.fixture(scope="module")
def slow_pair(redis_server, client, slow_model, tmp_path_factory):
    """Two workers on one queue for a model big enough that a long request takes seconds."""
    yield from two_workers("slow", slow_model, redis_server, client, tmp_path_factory.mktemp("slow-logs"),
                           concurrency=1, env=SLOW_ENV)


def test_a_newer_request_from_the_same_editor_cancels_the_older_task(redis_server, client, slow_pair):
    """The worker running a superseded task stops it (Cancelled) instead of finishing a stale answer."""
    backend = CeleryBackend(["slow"], redis_url=redis_server.url)
    before = {w.node(): worker_stats(client, w.node()).get("started", 0) for w in slow_pair}
    old = CompletionRequest(text="Once upon a time", model="slow", n=4, max_new_tokens=256, stop=None,
                            seed=1, fresh=True)
    box = {}

    def call():
        try:
            box["result"] = backend.complete(old, timeout=90, supersede="editor-1")
        except Exception as e:
            box["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    try:
        wait_for(lambda: any(worker_stats(client, n).get("started", 0) > c for n, c in before.items()),
                 30, "a worker to start the older task", every=0.01)
        newer = CompletionRequest(text="Once upon a time there", model="slow", n=1, max_new_tokens=8,
                                  stop=None, seed=2, fresh=True)
        assert backend.complete(newer, timeout=90, supersede="editor-1").suggestions
        caller.join(90)
        assert isinstance(box.get("error"), Cancelled), f"the older request was not cancelled: {box}"
        other = CompletionRequest(text="Another editor", model="slow", n=1, max_new_tokens=8, stop=None,
                                  seed=3, fresh=True)
        assert backend.complete(other, timeout=90, supersede="editor-2").suggestions  # other keys untouched
    finally:
        caller.join(1)
        backend.close()


def test_a_task_of_a_killed_worker_is_finished_by_another(redis_server, client, slow_pair):
    backend = CeleryBackend(["slow"], redis_url=redis_server.url)
    nodes = {w.node(): w for w in slow_pair}
    base = {n: worker_stats(client, n) for n in nodes}  # earlier tests may have used these workers

    def count(node, field):
        return worker_stats(client, node).get(field, 0) - base[node].get(field, 0)
    request = CompletionRequest(text="Once upon a time", model="slow", n=10, max_new_tokens=256, stop=None,
                                seed=5, fresh=True)
    box = {}

    def call():
        try:
            box["result"] = backend.complete(request, timeout=90)
        except Exception as e:  # shown by the assertion below
            box["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    try:
        victim = wait_for(lambda: next((n for n in nodes if count(n, "started")), None),
                          30, "a worker to start the task", every=0.01)
        nodes[victim].kill()  # mid-task: decoding takes 1.5 s (the soft limit)
        killed = time.monotonic()
        assert count(victim, "done") == 0, "the task finished before the kill"
        caller.join(90)
        # Redelivered after the workers' visibility timeout (5 s) and a sweep, decoded for 1.5 s: a
        # liveness bound, generous, not a speed claim.
        assert time.monotonic() - killed < 30, "the redelivered task took too long"
        assert "result" in box, f"the request did not complete after its worker was killed: {box}"
        survivor = next(n for n in nodes if n != victim)
        assert box["result"].suggestions
        assert count(survivor, "done") >= 1
        assert count(victim, "done") == 0

        # A worker that stops cleanly leaves the registry at once; a killed one when its
        # announcement expires. Then the app says so at once instead of waiting.
        nodes[survivor].stop()
        assert survivor not in [w["node"] for w in live_workers(client, "slow")]
        wait_for(lambda: not live_workers(client, "slow"), 15, "the killed worker's announcement to expire")
        with pytest.raises(NoWorker, match="no worker is serving slow"):
            backend.complete(request, timeout=300)
    finally:
        caller.join(1)
        backend.close()


# Workers with the default visibility timeout (hard limit + 10 s): the task of a worker that dies
# cannot be redelivered before a 20 s request's deadline, so the caller is told at once.
DEFAULT_VISIBILITY_ENV = {**FAST_ENV, "WWT_TASK_SOFT_TIME_LIMIT": "10", "WWT_TASK_TIME_LIMIT": "12"}
DEAD_WORKER_BOUND_S = 15  # heartbeat 1 s: an announcement expires within 3 s; a liveness bound, generous


def _long_request(seed):
    return CompletionRequest(text="Once upon a time", model="slow", n=10, max_new_tokens=256, stop=None,
                             seed=seed, fresh=True)


def _call_in_thread(backend, request, timeout, box):
    def call():
        try:
            box["result"] = backend.complete(request, timeout=timeout)
        except Exception as e:  # shown by the assertions
            box["error"] = e
        box["at"] = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_a_killed_workers_request_fails_in_seconds_with_the_reason(redis_server, client, slow_model,
                                                                   tmp_path_factory):
    """SIGKILL mid-task, another worker alive, redelivery too late for the deadline: the completion,
    routed to the dead worker's own queue, is sent again to the model's shared queue within a few
    heartbeats, not at its timeout, and the other worker answers it (a task on the shared queue is
    told "the worker stopped" instead: test_affinity.py); then, with every worker dead, waiting
    callers hear "no worker" within seconds and new callers at once."""
    logs = tmp_path_factory.mktemp("dead-logs")
    workers = [Worker(f"slow={slow_model}", redis_server.url, logs, concurrency=1, env=DEFAULT_VISIBILITY_ENV,
                      name=f"dead{i}").start() for i in range(2)]
    backend = CeleryBackend(["slow"], redis_url=redis_server.url)
    threads = []
    try:
        for w in workers:
            w.wait_announced(client)
        nodes = {w.node(): w for w in workers}
        base = {n: worker_stats(client, n).get("started", 0) for n in nodes}
        box = {}
        threads.append(_call_in_thread(backend, _long_request(11), 20, box))
        victim = wait_for(lambda: next((n for n in nodes if worker_stats(client, n).get("started", 0) > base[n]),
                                       None), 30, "a worker to start the task", every=0.01)
        nodes[victim].kill()
        killed = time.monotonic()
        threads[-1].join(30)
        assert "result" in box, box
        survivor_node = next(n for n in nodes if n != victim)
        assert box["result"].timings.worker == survivor_node and box["result"].suggestions
        assert box["at"] - killed < DEAD_WORKER_BOUND_S, f"answered after {box['at'] - killed:.1f} s"

        # The last worker dies with requests waiting on it (one running, others queued behind it).
        survivor = next(w for n, w in nodes.items() if n != victim)
        started = worker_stats(client, survivor.node()).get("started", 0)
        boxes = [{} for _ in range(4)]
        threads += [_call_in_thread(backend, _long_request(20 + i), 20, b) for i, b in enumerate(boxes)]
        wait_for(lambda: worker_stats(client, survivor.node()).get("started", 0) > started, 30,
                 "the last worker to start a task", every=0.01)
        survivor.kill()
        killed = time.monotonic()
        for t in threads[-4:]:
            t.join(30)
        for b in boxes:
            assert isinstance(b.get("error"), NoWorker), b
            assert b["at"] - killed < DEAD_WORKER_BOUND_S, f"told after {b['at'] - killed:.1f} s"
        assert any("stopped (it may have crashed)" in b["error"].message for b in boxes)
        # Later callers are not held behind anything: "no worker" at once.
        t0 = time.monotonic()
        with pytest.raises(NoWorker, match="no worker is serving slow"):
            backend.complete(_long_request(30), timeout=20)
        assert time.monotonic() - t0 < 2
    finally:
        for t in threads:
            t.join(1)
        for w in workers:
            w.stop()
        backend.close()


def test_a_worker_without_redis_says_so(tmp_path):
    out = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--model", f"x={tmp_path}",
                          "--redis-url", "redis://:secret@127.0.0.1:1/0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in out.stderr
    assert "Traceback" not in out.stderr and "secret" not in out.stderr


def test_redis_down_is_a_clear_error_and_the_backend_recovers(redis_server, client, backend, pair):
    assert backend.complete(_req("Before the outage", fresh=True), timeout=60).suggestions
    redis_server.stop()
    try:
        with pytest.raises(BackendUnavailable, match="cannot reach Redis at redis://:\\*\\*\\*@127.0.0.1"):
            backend.complete(_req("During the outage", fresh=True), timeout=60)
        with pytest.raises(BackendUnavailable):
            backend.complete(_req("During the outage"), timeout=60)  # the cache is in Redis too
        with pytest.raises(BackendUnavailable):
            backend.save_document("hello")
        assert backend.models() == ["tiny"]  # the configured models are still listed
        assert "cannot reach Redis" in backend.model_info("tiny")["error"]
    finally:
        redis_server.start()  # same port and password; the data is gone

    # Workers reconnect and announce again; then the same backend object serves again.
    wait_for(lambda: len(live_workers(client, "tiny")) == 2, 60, "the workers to announce again", every=0.2)

    def works():
        try:
            return backend.complete(_req("After the outage", fresh=True), timeout=30)
        except (BackendUnavailable, NoWorker):
            return None

    result = wait_for(works, 60, "a completion after Redis came back", every=0.5)
    assert result.suggestions and result.timings.source == "engine"


# -- configuration ----------------------------------------------------------------------------------

def test_names_and_urls_are_made_safe():
    assert queue_name("tiny-gpt2") == "wwt.tiny-gpt2"
    assert queue_name("org/repo") != queue_name("org_repo") and "/" not in queue_name("org/repo")
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert "s3cret" not in redact("redis://user:s3cret@host/1")


def test_time_limits_are_checked_for_consistency(monkeypatch):
    from workers.celery_app import make_app

    app = make_app("redis://:pw@127.0.0.1:1/0")
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit <= conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]
    assert conf.result_expires > 0 and conf.accept_content == ["json"]
    monkeypatch.setenv("WWT_VISIBILITY_TIMEOUT", "10")
    monkeypatch.setenv("WWT_TASK_TIME_LIMIT", "30")
    with pytest.raises(QueueMisconfigured, match="the queue is misconfigured: WWT_VISIBILITY_TIMEOUT"):
        QueueConfig.from_settings()
    with pytest.raises(QueueMisconfigured, match="WWT_VISIBILITY_TIMEOUT"):
        QueueConfig(time_limit=30, visibility_timeout=10)  # built directly, checked the same way
    monkeypatch.setenv("WWT_TASK_TIME_LIMIT", "soon")
    with pytest.raises(QueueMisconfigured, match="WWT_TASK_TIME_LIMIT must be a number, not 'soon'"):
        QueueConfig.from_settings()
    monkeypatch.setenv("WWT_TASK_TIME_LIMIT", "3")
    monkeypatch.setenv("WWT_TASK_SOFT_TIME_LIMIT", "2")
    monkeypatch.setenv("WWT_HEARTBEAT_S", "5")
    monkeypatch.setenv("WWT_HEARTBEAT_TTL_S", "4")
    with pytest.raises(QueueMisconfigured, match="WWT_HEARTBEAT_TTL_S"):
        QueueConfig.from_settings()
    monkeypatch.delenv("WWT_HEARTBEAT_TTL_S")
    monkeypatch.delenv("WWT_VISIBILITY_TIMEOUT")
    conf = make_app("redis://127.0.0.1:1/0", QueueConfig.from_settings()).conf  # what was read is what is used
    assert conf.task_time_limit == 3 and conf.broker_transport_options["visibility_timeout"] == 13


MISCONFIGURED = {"WWT_TASK_SOFT_TIME_LIMIT": "5", "WWT_TASK_TIME_LIMIT": "10", "WWT_VISIBILITY_TIMEOUT": "5"}


@pytest.mark.parametrize("command", [
    ["worker", "--model", "tiny=/nonexistent", "--device", "cpu"],
    ["serve", "--backend", "celery", "--model", "tiny", "--port", "1"],
    ["complete", "--backend", "celery", "--model", "tiny", "Hi"],
])
def test_a_misconfigured_queue_is_one_readable_line_in_a_fresh_process(command):
    """Contradictory time limits: the CLI says what is wrong and exits, with no traceback, before it
    loads a model, reaches Redis or listens on a port. A fresh process, so nothing was imported yet."""
    env = {**os.environ, **MISCONFIGURED, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "WWT_REDIS_URL": "redis://:pw@127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-m", "app.cli", *command], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert ("error: the queue is misconfigured: WWT_VISIBILITY_TIMEOUT (5 s) must be longer than "
            "WWT_TASK_TIME_LIMIT (10 s)") in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_the_celery_app_module_imports_with_any_settings_and_builds_on_first_use():
    """`import workers.celery_app` builds nothing (the app's backend and the worker import it);
    `workers.celery_app.app`, what `celery -A workers.celery_app` reads, is built on first access,
    and with contradictory settings Celery's own command line ends with the same one line as
    `wwt worker`, status 2, no traceback."""
    code = "import workers.celery_app as m\nprint('imported')\nm.app\n"
    env = {**os.environ, **MISCONFIGURED}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == "imported\n", (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("error: the queue is misconfigured: WWT_VISIBILITY_TIMEOUT"), out.stderr
    celery = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert celery.returncode == 2, (celery.returncode, celery.stderr)
    assert celery.stderr.strip().splitlines() == [
        "error: the queue is misconfigured: WWT_VISIBILITY_TIMEOUT (5 s) must be longer than WWT_TASK_TIME_LIMIT (10 s)"]
    env = {k: v for k, v in os.environ.items() if k not in MISCONFIGURED}
    out = subprocess.run([sys.executable, "-c", "import workers.celery_app as m; print(m.app.conf.task_acks_late)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def _compose_cli():
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _compose_config(cli, tmp_path, password):
    """`compose config -q` with only the given REDIS_PASSWORD (an empty env file: no .env is read)."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    if password is not None:
        env["REDIS_PASSWORD"] = password
    return subprocess.run([*cli, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_compose_refuses_to_start_without_a_redis_password(tmp_path):
    """No silent fallback password: without REDIS_PASSWORD compose stops and says what to set."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text and "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}" in text
    assert "${REDIS_PASSWORD:-" not in text and "${REDIS_PASSWORD}" not in text
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    out = _compose_config(cli, tmp_path, None)
    assert out.returncode != 0
    assert "set REDIS_PASSWORD in .env" in out.stderr + out.stdout


def test_compose_file_is_valid_and_has_the_services(tmp_path):
    cli = _compose_cli()
    if cli is not None:  # the real validator when it is installed
        out = _compose_config(cli, tmp_path, "s3cret-for-the-test")
        assert out.returncode == 0, out.stderr
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    redis_svc = services["redis"]
    command = " ".join(redis_svc["command"])
    assert "--requirepass" in command and "--appendonly yes" in command
    assert "healthcheck" in redis_svc and "ports" not in redis_svc
    assert "serve" in services["web"]["command"] and "celery" in services["web"]["command"]
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])  # ready = a worker serves the model
    for size in ("distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        worker = services[f"worker-{size}"]
        assert worker["command"][:4] == ["wwt", "worker", "--model", size]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and "--device cpu" in " ".join(cpu["command"])
    assert (ROOT / "Dockerfile").read_text().startswith("# ") and "python:3.11-slim" in (ROOT / "Dockerfile").read_text()


def test_a_quantized_worker_serves_through_the_queue(redis_server, client, tiny_gpt2_heads, tmp_path):
    """`name=folder@int8` on a worker: the queue is the name's, answers equal an int8 engine's here."""
    from model import Engine

    worker = Worker(f"tiny8={tiny_gpt2_heads}@int8", redis_server.url, tmp_path, concurrency=2, env=FAST_ENV,
                    name="tiny8").start()
    backend = CeleryBackend(["tiny8"], redis_url=redis_server.url, timeout=60)
    local = Engine.from_pretrained(f"tiny8={tiny_gpt2_heads}@int8", device="cpu")
    try:
        worker.wait_announced(client)
        info = backend.model_info("tiny8")
        assert info["precision"] == "int8" and info["weight_bytes"] > 0
        request = CompletionRequest(text="Once upon a time", model="tiny8", n=2, greedy=True, max_new_tokens=6,
                                    stop=None, fresh=True)
        remote = backend.complete(request, timeout=60)
        assert [s.token_ids for s in remote.suggestions] == [s.token_ids for s in local.complete(request).suggestions]
    finally:
        local.close()
        backend.close()
        worker.stop()


@pytest.mark.timeout(30)
def test_the_no_worker_hint_names_the_spec_the_app_was_given(redis_server, tmp_path):
    """A folder model needs `name=folder` (and its precision) on the worker's command line."""
    folder = tmp_path / "weights"
    b = CeleryBackend([f"mine={folder}@int8"], redis_url=redis_server.url, timeout=30)
    try:
        with pytest.raises(NoWorker) as e:
            b.complete(_req("Hi", model="mine", fresh=True), timeout=30)
        assert f"wwt worker --model mine={folder}@int8" in e.value.message
    finally:
        b.close()


@pytest.mark.timeout(120)
def test_redis_lost_while_requests_wait_is_a_clear_error_and_leaves_nothing_to_finalise(
        tiny_gpt2_heads, tmp_path, capfd):
    """Redis goes away while plain calls and streams wait on a dead worker's tasks: each ends
    BackendUnavailable (not Celery's "the application must be restarted" as a generic failure),
    no result the app gave up on warns from its finaliser, and the same backend serves again once
    Redis is back."""
    import gc

    from dist_support import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    worker = Worker(f"tiny={tiny_gpt2_heads}", server.url, tmp_path, concurrency=1, env=FAST_ENV, name="lone").start()
    backend = CeleryBackend(["tiny"], redis_url=server.url, timeout=60)
    outcomes = []

    def one(i):
        request = _req(f"Waiting in line {i}", fresh=True, max_new_tokens=100)
        try:
            if i % 2:
                last = list(backend.stream(request, timeout=30))[-1]
                outcomes.append(last["kind"] if last["type"] == "error" else "answered")
            else:
                backend.complete(request, timeout=30)
                outcomes.append("answered")
        except Exception as e:  # noqa: BLE001 - the type is what the test checks
            outcomes.append(type(e).__name__)

    try:
        worker.wait_announced(server.client())
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: total_tasks(server.client()) >= 1, 30, "the worker to take a task")
        worker.kill()  # nothing will answer the tasks now
        server.stop()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 6
        assert set(outcomes) <= {"answered", "BackendUnavailable", "backend_unavailable"}, outcomes
        assert {"BackendUnavailable", "backend_unavailable"} & set(outcomes), outcomes
        gc.collect()
        assert "Exception ignored" not in capfd.readouterr().err

        server.start()
        again = Worker(f"tiny={tiny_gpt2_heads}", server.url, tmp_path, concurrency=1, env=FAST_ENV, name="again")
        with again.start():
            again.wait_announced(server.client())
            assert backend.complete(_req("After the outage", fresh=True), timeout=30).suggestions
    finally:
        backend.close()
        worker.stop()
        server.stop()
    del backend
    gc.collect()
    assert "Exception ignored" not in capfd.readouterr().err
