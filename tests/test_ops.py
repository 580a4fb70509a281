"""Operations: GET /healthz and GET /metrics on a real `wwt serve` (embedded and celery), the
odd inputs of issue 12 point 7 through plain HTTP and gradio_client, the Redis password warning,
and worker stats keys that stay bounded across restarts."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request

import pytest

from ui_support import Server, call_over_http

gradio_client = pytest.importorskip("gradio_client")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when it is not there yet)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


# -- /healthz and /metrics ----------------------------------------------------------------------

def test_healthz_is_ready_when_the_default_model_is_loaded(server):
    status, kind, body = _get(server.url + "healthz")
    assert status == 200 and kind.startswith("application/json")
    state = json.loads(body)
    assert state["ready"] is True and state["backend"] == "local" and state["model"] == "tiny"
    assert state["precision"] == "float32"  # the precision it runs in: a small model on a CPU


def test_metrics_count_requests_refusals_and_latency(server, client):
    status, kind, before = _get(server.url + "metrics")
    assert status == 200 and kind.startswith("text/plain")
    assert "# TYPE wwt_requests_total counter" in before
    assert "# TYPE wwt_request_duration_seconds histogram" in before
    assert metric(before, "wwt_ready") == 1 and metric(before, "wwt_backend_up") == 1
    assert metric(before, "wwt_model_loaded", model="tiny") == 1
    assert "wwt_queue_depth" in before

    client.predict("Once upon a time", max_new_tokens=2, api_name="/complete")
    client.predict("Hello world", model="heads", api_name="/score")
    with pytest.raises(Exception):
        client.predict("Hi", n=99, api_name="/complete")
    with pytest.raises(Exception):
        client.predict("Hi", model="gpt9" * 1000, api_name="/complete")
    stream = urllib.request.Request(server.url + "wwt/stream", method="POST",
                                    data=json.dumps({"before": "Once", "max_new_tokens": 2}).encode(),
                                    headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(stream, timeout=60) as r:
        assert b"event: done" in r.read()

    _, _, after = _get(server.url + "metrics")
    grew = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert grew("wwt_requests_total", endpoint="complete", model="tiny") == 2
    assert grew("wwt_requests_total", endpoint="score", model="heads") == 1
    assert grew("wwt_requests_total", endpoint="stream", model="tiny") == 1
    assert grew("wwt_refusals_total", endpoint="complete", model="tiny", kind="bad_request") == 1
    # a name the app does not offer is never a label: it is counted under "-"
    assert grew("wwt_refusals_total", endpoint="complete", model="-", kind="unknown_model") == 1
    assert "gpt9" not in after
    assert grew("wwt_request_duration_seconds_count", endpoint="complete", model="tiny") == 2
    assert grew("wwt_request_duration_seconds_bucket", endpoint="stream", model="tiny", le="+Inf") == 1
    assert metric(after, "wwt_errors_total", endpoint="complete", model="tiny", kind="internal") == 0
    # the KV cache: what it holds, and how much of the prompts it gave back
    used, free = metric(after, "wwt_kv_tokens_used", model="tiny"), metric(after, "wwt_kv_tokens_free", model="tiny")
    assert used > 0 and free > 0 and "# TYPE wwt_kv_evictions_total counter" in after
    assert grew("wwt_prompt_tokens_prefilled_total", model="tiny") > 0
    reused, prefilled = (metric(after, f"wwt_prompt_tokens_{k}_total", model="tiny") for k in ("reused", "prefilled"))
    assert metric(after, "wwt_kv_reuse_ratio", model="tiny") == pytest.approx(reused / (reused + prefilled))


# -- issue 12, point 7: odd inputs are a readable message and change nothing ---------------------

@pytest.mark.parametrize("labels,message", [
    (5, "labels must be text (comma-separated) or a list of texts (got 5)"),
    (True, "labels must be text (comma-separated) or a list of texts (got True)"),
    (["sunny", 3], "labels must be text (comma-separated) or a list of texts"),
    ("sunny, " + "rain " * 2000, "tokens long; tiny reads labels of at most 245 tokens (its context is 256)"),
], ids=["number", "bool", "list-with-number", "longer-than-context"])
def test_classify_labels_that_are_not_usable_are_a_clear_message(server, labels, message):
    event, data = call_over_http(server, "classify", {"data": ["Nice weather", labels, "tiny"]})
    assert event == "error" and message in (data.get("error") or ""), data
    assert "Traceback" not in data["error"] and "internal error" not in data["error"]
    event, data = call_over_http(server, "classify", {"data": ["Nice weather", "sunny, rainy", "tiny"]})
    assert event == "complete"  # and the server goes on answering


def test_classify_labels_with_lone_surrogates_are_cleaned(server):
    event, data = call_over_http(server, "classify", {"data": ["Nice weather", "sun\ud800ny, rainy", "tiny"]})
    assert event == "complete", data
    assert {x["label"] for x in data[0]["labels"]} == {"sun\ufffdny", "rainy"}


@pytest.mark.parametrize("endpoint", ["classify", "complete", "answer", "score"])
def test_an_empty_data_list_is_a_readable_message(server, endpoint):
    event, data = call_over_http(server, endpoint, {"data": []})
    assert event == "error" and data["error"] and "is missing" in data["error"], data


def test_a_huge_model_name_is_not_echoed_back(server):
    name = "m" * 200_000
    for endpoint, inputs in (("complete", ["Hi", name]), ("classify", ["Hi", "a, b", name]),
                             ("score", ["Hi", name])):
        event, data = call_over_http(server, endpoint, {"data": inputs})
        assert event == "error" and data["error"].startswith("unknown model 'mmmm"), data
        assert len(data["error"]) < 300 and "this app offers tiny, heads" in data["error"]


def test_api_suggestions_hold_no_control_characters(client):
    """The engine cleans what it writes; through the API too (not only in the editor)."""
    texts = []
    for seed in range(4):
        out = client.predict("\x00\x01\x1b[31m a\x07b", "tiny", 10, 24, 2.0, 0, 1.0, True, seed, api_name="/complete")
        texts += [s["text"] for s in out["suggestions"]]
    assert texts and not any(CONTROL.search(t) for t in texts)


# -- the Redis password warning ------------------------------------------------------------------

@pytest.mark.parametrize("url,warns", [
    ("redis://localhost:6379/0", False),
    ("redis://127.0.0.1:6379/0", False),
    ("redis://[::1]:6379/0", False),
    ("redis://:s3cret@redis:6379/0", False),
    ("redis://user:s3cret@10.0.0.5:6379/0", False),
    ("redis://redis:6379/0", True),
    ("redis://10.0.0.5:6379/0", True),
    ("rediss://cache.example.com:6380/0", True),
])
def test_a_redis_url_without_a_password_on_another_host_warns(url, warns):
    from workers.queues import insecure_redis_warning

    warning = insecure_redis_warning(url)
    assert bool(warning) == warns
    if warns:
        assert "without a password" in warning and "s3cret" not in warning


@pytest.fixture
def celery_backend():
    """A CeleryBackend for a Redis URL; it connects only when asked something, so no Redis is needed
    as long as the test answers model_info and models itself."""
    from app.backends import make_backend
    from app.app_config import AppConfig

    made = []

    def make(url: str):
        backend = make_backend(AppConfig(backend="celery", models=("tiny",), redis_url=url))
        backend.model_info = lambda name: {"name": name, "served": True, "workers": ["w1@host"]}
        backend.models = lambda: ["tiny"]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.mark.parametrize("url,warns", [
    ("redis://10.1.2.3:6379/0", True),
    ("redis://:pw@10.1.2.3:6379/0", False),
    ("redis://127.0.0.1:6379/0", False),
])
def test_the_page_status_shows_the_redis_warning(celery_backend, url, warns):
    from app.web import callbacks

    backend = celery_backend(url)
    html = callbacks.model_status(backend, "tiny")
    assert "tiny · 1 worker(s)" in html
    assert ("used without a password on a non-loopback address" in html) == warns
    assert ('class="wwt-warning" role="alert"' in html) == warns
    assert "10.1.2.3" not in html and ":pw@" not in html  # every visitor sees the page: no address
    # also when Redis cannot be asked about the model
    from model.errors import BackendUnavailable

    def down(name):
        raise BackendUnavailable("cannot reach Redis")

    backend.model_info = down
    html = callbacks.model_status(backend, "tiny")
    assert "cannot reach Redis" in html and ("without a password" in html) == warns


def test_the_page_is_built_with_the_redis_warning_in_its_status(celery_backend):
    from app.web.ui import build_ui

    demo = build_ui(celery_backend("redis://10.1.2.3:6379/0"))
    status = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "wwt-model-status")
    assert "used without a password" in status.value


def test_local_backend_status_has_no_redis_warning():
    from app.web import callbacks
    from ui_support import ScriptedBackend

    fake = ScriptedBackend()
    fake.url = "redis://10.1.2.3:6379/0"  # not a celery backend: no Redis of its own
    assert "without a password" not in callbacks.model_status(fake, "m1")


@pytest.mark.parametrize("url,warns", [("redis://10.1.2.3:6379/0", True), ("redis://:pw@10.1.2.3:6379/0", False)])
def test_serve_with_the_celery_backend_warns_at_start(monkeypatch, caplog, url, warns):
    """`wwt serve --backend celery --redis-url URL` logs the warning (with the address) before the page starts."""
    import logging

    from app import cli, server

    class NoPage:
        def launch(self, **kwargs):
            raise KeyboardInterrupt  # stop where the server would start listening

    real_prepare = server.prepare_backend

    def prepare_backend(*args, **kwargs):
        backend = real_prepare(*args, **kwargs)
        backend.models = lambda: ["tiny"]  # the start line names the models: no Redis to ask
        return backend

    monkeypatch.setattr(server, "prepare_backend", prepare_backend)
    monkeypatch.setattr(server, "build_app", lambda backend, config: NoPage())
    monkeypatch.setattr(server.signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    monkeypatch.setattr(server, "app_kwargs", lambda backend, config: {})
    caplog.set_level(logging.WARNING, logger="app.server")
    assert cli.main(["serve", "--backend", "celery", "--redis-url", url, "--model", "tiny", "--port", "1"]) == 0
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warns:
        assert any("Redis at redis://10.1.2.3:6379/0 is used without a password" in m for m in logged), logged
    else:
        assert not any("without a password" in m for m in logged), logged


# -- celery mode: /healthz follows the workers, /metrics reads Redis -----------------------------

@pytest.mark.redis
@pytest.mark.timeout(240)
def test_celery_healthz_and_metrics_follow_the_workers(tiny_gpt2, tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from dist_support import RedisServer, Worker, wait_for

    folder = tmp_path_factory.mktemp("ops-celery")
    redis_server = RedisServer(tmp_path_factory.mktemp("ops-redis")).start()
    client = redis_server.client()
    web = Server(["tiny"], folder, backend="celery", redis_url=redis_server.url,
                 extra_env={"WWT_HEARTBEAT_S": "1"}).start()
    worker = None
    try:
        status, _, body = _get(web.url + "healthz")
        assert status == 503 and json.loads(body)["ready"] is False
        assert "no worker is serving tiny" in json.loads(body)["reason"]
        _, _, text = _get(web.url + "metrics")
        assert metric(text, "wwt_ready") == 0 and metric(text, "wwt_live_workers", model="tiny") == 0
        assert metric(text, "wwt_backend_up") == 1

        worker = Worker(f"tiny={tiny_gpt2}", redis_server.url, folder, concurrency=2,
                        env={"WWT_HEARTBEAT_S": "1"}, name="tiny").start()
        worker.wait_announced(client)
        wait_for(lambda: _get(web.url + "healthz")[0] == 200, 30, "/healthz to say ready")
        assert json.loads(_get(web.url + "healthz")[2])["workers"] == 1
        assert json.loads(_get(web.url + "healthz")[2])["precision"] == "float32"  # as the worker announced
        api = gradio_client.Client(web.url, verbose=False)
        for _ in range(2):  # the second is a suggestion-cache hit
            api.predict("Once upon a time", "tiny", 2, 4, 0.0, 0, 0.9, False, None, api_name="/complete")
        _, _, text = _get(web.url + "metrics")
        assert metric(text, "wwt_live_workers", model="tiny") == 1
        assert metric(text, "wwt_queue_depth", model="tiny") == 0
        assert metric(text, "wwt_suggestion_cache_hits_total", kind="exact") >= 1
        assert metric(text, "wwt_requests_total", endpoint="complete", model="tiny") == 2
        # the worker's KV-cache gauges, from its heartbeats (one beat after its request)
        wait_for(lambda: metric(_get(web.url + "metrics")[2], "wwt_prompt_tokens_prefilled_total", model="tiny") > 0,
                 30, "the worker's KV-cache gauges in /metrics")
        _, _, text = _get(web.url + "metrics")
        assert metric(text, "wwt_kv_tokens_used", model="tiny") > 0 and metric(text, "wwt_kv_tokens_free", model="tiny") > 0
    finally:
        if worker is not None:
            worker.stop()
        web.stop()
        redis_server.stop()


@pytest.mark.redis
def test_worker_stats_keys_stay_bounded_across_restarts(tmp_path, monkeypatch):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from dist_support import RedisServer
    from workers import tasks

    redis_server = RedisServer(tmp_path).start()
    try:
        client = redis_server.client()
        monkeypatch.setattr(tasks, "_redis", client)
        for pid in range(tasks.MAX_WORKER_STATS + 40):  # a worker restarted again and again: a new node each time
            tasks._count(f"wwt.tiny-{pid}@host", "started")
        keys = client.keys(tasks.WORKER_STATS_PREFIX + "*")
        assert len(keys) == tasks.MAX_WORKER_STATS
        newest = f"wwt.tiny-{tasks.MAX_WORKER_STATS + 39}@host"
        assert client.hget(tasks.WORKER_STATS_PREFIX + newest, "started") == b"1"
        assert not client.exists(tasks.WORKER_STATS_PREFIX + "wwt.tiny-0@host")
        assert int(client.hget(tasks.STATS_KEY, "started")) == tasks.MAX_WORKER_STATS + 40  # the total stays whole
        assert all(client.ttl(k) > 0 for k in keys)
    finally:
        redis_server.stop()
