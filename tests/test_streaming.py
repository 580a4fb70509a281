"""Suggestions that arrive as they are written: engine, embedded backend, HTTP endpoint, queue.

Each level checks the same promise (model/streaming.py): partial suggestions arrive while the
request is still running, a partial text only grows, the final answer equals the
non-streaming one for the same seed, and a reader that goes away frees the slots. Where a
request must still be running when a partial is read, the model is slowed down instead of
racing it; nothing here measures speed.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from app.backends.local import LocalBackend
from model import Engine
from model.serving.engine_config import EngineConfig
from model.errors import Cancelled, RequestTimeout
from model.network.tiny import make_tiny_model
from model.streaming import GrowOnly
from model.types import CompletionRequest, PartialSuggestion
from model_support import idle, slow_down, suggest, wait_until
from ui_support import Server
from app.bench.processes import free_port

DEVICE = "cpu"
STORY = "The weather in the valley turned cold that night. Snow covered the"






def assert_growing(snapshots: list[list[dict]]) -> dict[int, str]:
    """Every text starts with the one shown before it for the same index; the last text of each."""
    last: dict[int, str] = {}
    for suggestions in snapshots:
        for s in suggestions:
            before = last.get(s["index"], "")
            assert s["text"].startswith(before), f"suggestion {s['index']} shrank: {before!r} -> {s['text']!r}"
            last[s["index"]] = s["text"]
    return last


# -- the engine ---------------------------------------------------------------------------------
def test_partials_arrive_while_running_grow_and_end_in_the_same_answer(make_engine):
    engine = make_engine(delay=0.005)
    request = CompletionRequest(STORY, n=3, max_new_tokens=32, seed=7, stop=None)
    handle = engine.submit(request)
    updates, running_when_read = [], []
    for update in engine.stream(handle):
        running_when_read.append(not handle.done())
        updates.append(update)
    *partials, final = updates
    assert final.completion is not None and all(u.completion is None for u in partials)
    assert len(partials) >= 8, f"{len(partials)} partial updates for 32 tokens"
    read_early = [u for u, running in zip(partials, running_when_read) if running and any(s.text for s in u.suggestions)]
    assert read_early, "no partial text was read before the request finished"
    last = assert_growing([[s.to_dict() for s in u.suggestions] for u in partials])
    # The same request without streaming, on a fresh engine, gives the same answer.
    alone = make_engine().complete(request)
    assert [s.token_ids for s in final.completion.suggestions] == [s.token_ids for s in alone.suggestions]
    assert [s.text for s in final.suggestions] == [s.text for s in alone.suggestions]
    assert sorted(last.values()) == sorted(s.text for s in alone.suggestions)


def test_the_first_tokens_are_published_before_the_next_step(make_engine, monkeypatch):
    """A streaming reader's first partial comes right after the prefill picked the first tokens,
    not one decode step later (on gpt2-xl on a CPU a step is about 150 ms)."""
    from model.serving import jobs

    published = []
    real = jobs.Progress.publish

    def record(progress, snapshot):
        published.append([len(p.token_ids) for p in snapshot])
        real(progress, snapshot)

    monkeypatch.setattr(jobs.Progress, "publish", record)
    engine = make_engine()
    request = CompletionRequest(STORY, n=2, max_new_tokens=6, seed=3, stop=None, logprobs=0)
    updates = list(engine.stream(engine.submit(request)))
    assert updates[-1].completion is not None
    assert published and published[0] == [1, 1], published[:3]  # one token a row: the prefill's
    assert published[1] == [2, 2]  # then one more per decode step


def test_partial_texts_under_the_auto_stop_rule_grow_into_the_answer(make_engine):
    """The last partial of each kept row is its suggestion, and every earlier partial a prefix of it."""
    engine = make_engine()
    cut = 0
    for seed in range(12):
        request = CompletionRequest(STORY, n=3, max_new_tokens=40, temperature=1.5, seed=seed, stop="auto")
        *partials, final = list(engine.stream(engine.submit(request)))
        assert [s.text for s in partials[-1].suggestions] == [s.text for s in final.completion.suggestions]
        shown = assert_growing([[s.to_dict() for s in u.suggestions] for u in partials])
        assert all(shown[s.index] == s.text for s in partials[-1].suggestions)
        cut += sum(s.finish_reason == "stop" for s in final.completion.suggestions)
    assert cut, "no suggestion was cut by a stop rule: the test did not test it"


def test_the_start_of_a_stop_string_is_held_back_until_it_is_known(make_engine):
    """A stop string that spans two steps: the text before it is shown, never its first half.

    The engine is slowed down so its reader sees every step (snapshots coalesce only for a reader
    slower than the steps): the greedy text's step boundaries are all there, and the step that
    ends in the stop string's first half is read while the request still runs."""
    engine = make_engine(delay=0.05)
    request = CompletionRequest(STORY, n=1, max_new_tokens=24, greedy=True, stop=None)
    texts = [u.suggestions[0].text for u in engine.stream(engine.submit(request))][:-1]
    for before, after in zip(texts, texts[1:]):
        if before and len(after) > len(before) and not before[-1].isspace():
            stop = before[-1] + after[len(before)]  # last character of one step, first of the next
            if after.find(stop) == len(before) - 1:  # nowhere earlier
                break
    else:
        pytest.fail(f"no step boundary to put a stop string across in {texts}")
    request = CompletionRequest(STORY, n=1, max_new_tokens=24, greedy=True, stop=[stop])
    *partials, final = list(engine.stream(engine.submit(request)))
    assert final.completion.suggestions[0].text == before[:-1]
    assert final.completion.suggestions[0].finish_reason == "stop"
    shown = assert_growing([[s.to_dict() for s in u.suggestions] for u in partials])
    assert shown[0] == before[:-1], f"{shown[0]!r} was shown, then cut to {before[:-1]!r}"
    # The step that wrote the first half was read while the request still ran: held back there.
    assert any(not u.suggestions[0].finished and u.suggestions[0].text == before[:-1] for u in partials), partials


def test_grow_only_keeps_a_shown_text_from_shrinking():
    grow = GrowOnly()
    assert [s.text for s in grow.apply([PartialSuggestion(0, "Hel"), PartialSuggestion(1, "a")])] == ["Hel", "a"]
    assert [s.text for s in grow.apply([PartialSuggestion(0, "He"), PartialSuggestion(1, "ab")])] == ["Hel", "ab"]
    assert [s.text for s in grow.apply([PartialSuggestion(0, "Hello")])] == ["Hello"]


def test_closing_the_stream_cancels_the_request_and_frees_its_slots(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    handle = engine.submit(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=100, stop=None))
    updates = engine.stream(handle)
    for update in updates:
        if any(s.text for s in update.suggestions):
            break
    assert engine.scheduler.pool.busy(), "the request ended before the test could cancel it"
    updates.close()  # the reader went away
    with pytest.raises(Cancelled):
        handle.result(timeout=30)
    assert idle(engine)
    assert suggest(engine, "Hello there", n=2, max_new_tokens=4, seed=1)  # the engine goes on serving


def test_a_stream_past_its_timeout_raises_and_frees_the_slots(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    with pytest.raises(RequestTimeout):
        handle = engine.submit(CompletionRequest(STORY, n=3, max_new_tokens=100, stop=None))
        for _ in engine.stream(handle, timeout=0.05):
            pass
    assert idle(engine)


def test_an_unwatched_request_builds_no_snapshots(make_engine):
    engine = make_engine()
    handle = engine.submit(CompletionRequest(STORY, n=2, max_new_tokens=8, seed=1))
    handle.result(timeout=30)
    assert handle.job.progress.wait(0, 0) == (0, (), True)


# -- the embedded backend -----------------------------------------------------------------------
@pytest.fixture
def slow_local(tiny_gpt2):
    """A LocalBackend whose engine is slowed down and records the handle of each request."""
    backend = make_slow_local(tiny_gpt2)
    yield backend
    backend.close()


def make_slow_local(tiny_gpt2, engine_config=None):
    engines, handles = [], []

    def factory(source, **kwargs):
        engine = Engine.from_pretrained(source, **kwargs)
        slow_down(engine, 0.005)
        submit = engine.submit

        def recording_submit(request, client=None):
            handle = submit(request, client)
            handles.append(handle)
            return handle

        engine.submit = recording_submit
        engines.append(engine)
        return engine

    backend = LocalBackend([f"tiny={tiny_gpt2}"], device=DEVICE, slots=8, engine_factory=factory,
                           engine_config=engine_config)
    backend.handles = handles
    backend.engine("tiny")
    return backend


def test_local_backend_streams_partials_then_the_answer(slow_local):
    request = CompletionRequest(STORY, model="tiny", n=3, max_new_tokens=24, seed=3, stop=None)
    events = list(slow_local.stream(request, timeout=60))
    types = [e["type"] for e in events]
    assert types[-1] == "done" and set(types[:-1]) == {"partial"} and len(types) > 2, types
    assert_growing([e["suggestions"] for e in events[:-1]])
    again = slow_local.complete(request, timeout=60)
    assert [s["token_ids"] for s in events[-1]["result"]["suggestions"]] == [s.token_ids for s in again.suggestions]
    json.dumps(events)  # what the HTTP endpoint and Redis carry


def test_local_backend_errors_are_one_error_event(slow_local):
    events = list(slow_local.stream(CompletionRequest("Hi", model="gpt9")))
    assert events == [{"type": "error", "error": events[0]["error"], "kind": "unknown_model"}]
    events = list(slow_local.stream(CompletionRequest("Hi", model="tiny", n=0)))
    assert [e["type"] for e in events] == ["error"] and events[0]["kind"] == "bad_request"


def test_a_newer_stream_from_the_same_editor_cancels_the_older(slow_local):
    long = CompletionRequest(STORY, model="tiny", n=3, max_new_tokens=120, stop=None)
    older = slow_local.stream(long, timeout=60, supersede="editor-1")
    assert next(older)["type"] == "partial"
    newer = list(slow_local.stream(CompletionRequest(STORY + " snow", model="tiny", n=2, max_new_tokens=4),
                                            timeout=60, supersede="editor-1"))
    assert newer[-1]["type"] == "done"
    rest = list(older)
    assert rest[-1]["type"] == "error" and rest[-1]["kind"] == "cancelled"
    assert slow_local.superseding() == []
    assert idle(slow_local.engine("tiny"))


def test_cancel_from_another_thread_frees_the_slots(slow_local):
    stream = slow_local.stream(CompletionRequest(STORY, model="tiny", n=3, max_new_tokens=120, stop=None))
    assert next(stream)["type"] == "partial"
    threading.Thread(target=stream.cancel).start()
    assert list(stream)[-1]["kind"] == "cancelled"
    assert slow_local.handles[-1].job.cancelled
    assert idle(slow_local.engine("tiny"))


# -- the HTTP endpoint --------------------------------------------------------------------------
def read_events(response) -> list[dict]:
    """Parse Server-Sent Events as they arrive; each event's data is JSON with a `type`."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert data["type"] == name
            events.append(data)
            yield data


@pytest.fixture(scope="module")
def served(tiny_gpt2, tmp_path_factory):
    server = Server([f"tiny={tiny_gpt2}"], tmp_path_factory.mktemp("serve")).start()
    yield server
    server.stop()


def post_stream(url: str, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.stream("POST", url + "wwt/stream", content=content, headers={"Content-Type": "application/json"},
                        timeout=60, **kw)


def test_http_stream_sends_partials_before_done(served):
    body = {"before": STORY, "model": "tiny", "n": 3, "max_new_tokens": 64, "temperature": 1.0, "top_k": 0,
            "top_p": 0.9, "fresh": False, "client": "ed-1", "seed": 5}
    with post_stream(served.url, body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    types = [e["type"] for e in events]
    assert types[-1] == "done" and types.count("done") == 1, types
    assert "partial" in types[:-1], types
    assert any(s["text"] for e in events[:-1] for s in e["suggestions"]), "no partial text"
    assert_growing([e["suggestions"] for e in events[:-1]])
    result = events[-1]["result"]
    assert result["model"] == "tiny" and result["suggestions"]
    # The non-streaming API with the same settings and seed gives the same suggestions.
    from gradio_client import Client

    out = Client(served.url, verbose=False).predict(STORY, "tiny", 3, 64, 1.0, 0, 0.9, False, 5,
                                                     api_name="/complete")
    assert [s["text"] for s in out["suggestions"]] == [s["text"] for s in result["suggestions"]]


@pytest.mark.parametrize("body, kind, words", [
    ({"before": "Hello", "n": 99}, "bad_request", "n must be"),
    ({"before": "Hello", "model": "gpt9"}, "unknown_model", "gpt9"),
    ({"before": "Hello", "max_new_tokens": "8"}, "bad_request", "max_new_tokens"),
    ({"before": "Hello", "seed": -1}, "bad_request", "seed"),
    ([1, 2], "bad_request", "JSON object"),
    ("not json", "bad_request", "JSON"),
])
def test_http_stream_bad_input_is_one_readable_error_event(served, body, kind, words):
    with post_stream(served.url, body) as response:
        assert response.status_code == 200
        events = list(read_events(response))
    assert len(events) == 1 and events[0]["type"] == "error", events
    assert events[0]["kind"] == kind and words in events[0]["error"]
    assert "Traceback" not in events[0]["error"]


@pytest.fixture
def in_process(slow_local):
    """The real app (build_app, mounted routes) in this process, over the slowed embedded backend."""
    from ui_support import launch_in_process

    demo, url = launch_in_process(slow_local)
    yield url, slow_local
    demo.close()


def test_http_partial_is_read_while_the_engine_still_writes_and_hanging_up_cancels(in_process):
    url, backend = in_process
    body = {"before": STORY, "model": "tiny", "n": 3, "max_new_tokens": 120, "temperature": 0}
    with post_stream(url, body) as response:
        for event in read_events(response):
            if event["type"] == "partial" and any(s["text"] for s in event["suggestions"]):
                break
        handle = backend.handles[-1]
        assert not handle.done(), "the first partial text came only after the request had finished"
    # The connection is closed: the request is cancelled and its slots freed.
    assert wait_until(handle.done)
    assert handle.job.cancelled
    with pytest.raises(Cancelled):
        handle.result(timeout=1)
    assert idle(backend.engine("tiny"))


# -- the queue: worker -> Redis -> app ----------------------------------------------------------
@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    """Redis and one worker for a model big enough that 100 tokens take a while on a CPU."""
    from app.backends.celery import CeleryBackend
    from dist_support import RedisServer, Worker

    folder = make_tiny_model(tmp_path_factory.mktemp("stream-slow"), "gpt2", seed=3, n_positions=512, n_embd=256,
                             n_layer=8, n_head=8)
    redis_server = RedisServer(tmp_path_factory.mktemp("stream-redis")).start()
    client = redis_server.client()
    worker = Worker(f"slow={folder}", redis_server.url, tmp_path_factory.mktemp("stream-logs"), concurrency=2,
                    env={"WWT_HEARTBEAT_S": "1"}, name="stream0").start()
    try:
        worker.wait_announced(client)
        backend = CeleryBackend(["slow"], redis_url=redis_server.url, timeout=60)
        yield backend, client, worker
        backend.close()
    finally:
        worker.stop()
        redis_server.stop()


@pytest.mark.redis
def test_partials_travel_through_redis_and_end_in_the_task_result(queue):
    backend, client, _ = queue
    request = CompletionRequest(STORY, model="slow", n=2, max_new_tokens=24, seed=11, stop=None, fresh=True)
    events = list(backend.stream(request))
    types = [e["type"] for e in events]
    assert types[-1] == "done" and types.count("partial") >= 2, types
    assert_growing([e["suggestions"] for e in events[:-1]])
    result = events[-1]["result"]
    assert result["timings"]["worker"], "the answer did not come from a worker"
    again = backend.complete(request)
    assert [s["token_ids"] for s in result["suggestions"]] == [s.token_ids for s in again.suggestions]
    # The same request again is a suggestion-cache hit: one done event, no worker call.
    cached = list(backend.stream(CompletionRequest(STORY, model="slow", n=2, max_new_tokens=24, seed=11,
                                                            stop=None)))
    assert [e["type"] for e in cached] == ["done"] and cached[0]["result"]["timings"]["source"] == "cache"


@pytest.mark.redis
def test_a_reader_that_goes_away_stops_the_task_on_its_worker(queue):
    from dist_support import worker_stats

    backend, client, worker = queue
    node = worker.node()
    failed_before = worker_stats(client, node).get("failed", 0)
    stream = backend.stream(CompletionRequest(STORY, model="slow", n=3, max_new_tokens=250, stop=None,
                                                       fresh=True))
    first = next(stream)
    assert first["type"] == "partial"
    stream.close()  # cancels: the worker sees the mark and frees the slots
    assert wait_until(lambda: worker_stats(client, node).get("failed", 0) > failed_before, timeout=30), \
        "the worker finished the task nobody was reading"
    done = worker_stats(client, node).get("done", 0)
    assert list(backend.stream(CompletionRequest("Hello", model="slow", n=1, max_new_tokens=3,
                                                          fresh=True)))[-1]["type"] == "done"
    assert wait_until(lambda: worker_stats(client, node).get("done", 0) > done)


def test_http_stream_past_the_waiting_bound_is_one_busy_error_event(tiny_gpt2):
    from ui_support import launch_in_process

    # one waiting place, and no pace bound, so the refusal is the waiting bound's
    backend = make_slow_local(tiny_gpt2, EngineConfig(max_waiting=1, max_wait_s=None))
    demo, url = launch_in_process(backend)
    engine = backend.engine("tiny")
    running = engine.submit(CompletionRequest(STORY, n=8, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(engine.scheduler.pool.busy()) == 8)
    waiting = engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4))
    try:
        with post_stream(url, {"before": "Once upon", "model": "tiny"}) as response:
            events = list(read_events(response))
        busy = "busy: 1 request is waiting for tiny; try again in a moment"
        assert events == [{"type": "error", "kind": "busy", "error": busy, "answer": {"ok": False, "error": busy}}]
        assert not running.done()
    finally:
        running.cancel()
        waiting.cancel()
        demo.close()
    assert idle(engine)
    backend.close()
