"""The edges stay thin: configuration is built once at the entry points, every backend has one
completion primitive, one place decides what a caller is told, the page reads one answer shape,
and the code has no import cycle and no two production modules with one file name."""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from model import settings
from model.errors import OPERATOR, VISITOR, BackendUnavailable, WWTError, caller_error
from model.serving.engine_config import EngineConfig
from model.types import CompletionRequest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "model", "workers")
# Where configuration is built from the settings registry: the entry points and the config types.
EDGES = {"app/cli.py", "app/app_config.py", "app/server.py", "app.py", "workers/worker.py", "workers/queues.py",
         "workers/celery_app.py", "model/serving/engine_config.py", "model/network/weights.py", "model/settings.py"}


def _production_files() -> list[Path]:
    files = [ROOT / "app.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def _settings_readers(path: Path) -> list[int]:
    """Lines of `path` that call settings.get/get_int/get_float/get_bool/override/model_specs."""
    tree = ast.parse(path.read_text(), str(path))
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "settings"
                and node.func.attr in ("get", "get_int", "get_float", "get_bool", "override", "model_specs")):
            lines.append(node.lineno)
    return lines


def test_only_the_edges_read_the_settings_registry():
    readers = {}
    for path in _production_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel not in EDGES and _settings_readers(path):
            readers[rel] = _settings_readers(path)
    assert readers == {}, f"below the edge, these read settings (build a config at the entry point instead): {readers}"


def test_the_settings_reader_check_sees_a_read(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("from model import settings\n\ndef f():\n    return settings.get_int('WWT_SLOTS')\n")
    assert _settings_readers(sneaky) == [4]


def test_engine_config_defaults_are_the_registry_defaults(monkeypatch):
    """The suite, and a test that builds an Engine without saying otherwise, run the production policy."""
    for name in settings.names("WWT_"):
        monkeypatch.delenv(name, raising=False)
    assert EngineConfig.from_settings() == EngineConfig()
    assert EngineConfig().max_wait_s == 1.0 and EngineConfig().max_waiting == 32
    monkeypatch.setenv("WWT_MAX_WAIT_S", "0")
    monkeypatch.setenv("WWT_SLOTS", "5")
    monkeypatch.setenv("WWT_CPU_ONE_ROW", "plain")
    monkeypatch.setenv("WWT_CUDA_GRAPH", "0")
    assert EngineConfig.from_settings() == EngineConfig(slots=5, max_wait_s=None, cpu_one_row="plain",
                                                        cuda_graph=False)
    assert EngineConfig().unbounded() == EngineConfig(max_waiting=None, max_waiting_per_client=None, max_wait_s=None)
    monkeypatch.setenv("WWT_CPU_INT8", "Weight-Only")
    monkeypatch.setenv("WWT_KV_DTYPE", "bfloat16")
    assert EngineConfig.from_settings().cpu_int8 == "weight-only"
    assert EngineConfig.from_settings().kv_dtype == "bfloat16"


@pytest.mark.parametrize("name,value", [("WWT_CPU_INT8", "fastest"), ("WWT_KV_DTYPE", "int8"),
                                        ("WWT_CPU_ONE_ROW", "blas")])
def test_a_kernel_or_cache_setting_out_of_its_choices_names_itself(monkeypatch, name, value):
    """Refused where the configuration is built, before any model loads, naming the variable."""
    monkeypatch.setenv(name, value)
    with pytest.raises(settings.SettingError, match=f"{name} must be one of .*not '{value}'"):
        EngineConfig.from_settings()


def test_an_engine_reads_no_setting_after_it_is_built(make_engine, monkeypatch):
    engine = make_engine(config=EngineConfig(max_waiting=3, max_wait_s=None))
    monkeypatch.setenv("WWT_MAX_WAITING", "1")
    monkeypatch.setenv("WWT_MAX_WAIT_S", "0.001")
    assert engine.scheduler.max_waiting == 3 and engine.scheduler.max_wait_s is None
    assert engine.engine_config == EngineConfig(slots=engine.engine_config.slots, max_waiting=3, max_wait_s=None)


def test_the_app_config_is_read_once_at_the_edge(monkeypatch):
    from app.app_config import AppConfig

    monkeypatch.setenv("WWT_SHARE_LIMIT", "2")
    monkeypatch.setenv("WWT_MAX_WAIT_S", "0")
    monkeypatch.setenv("WWT_REQUEST_TIMEOUT", "9")
    config = AppConfig.from_settings(["tiny=/x"], backend="local", device=None)
    assert config.share_limit == 2 and config.request_timeout == 9 and config.engine.max_wait_s is None
    assert config.models == ("tiny=/x",) and config.backend == "local"
    monkeypatch.setenv("WWT_BACKEND", "celery")
    monkeypatch.setenv("WWT_VISIBILITY_TIMEOUT", "1")  # a contradiction is caught where the config is built
    with pytest.raises(WWTError, match="WWT_VISIBILITY_TIMEOUT"):
        AppConfig.from_settings()


# -- one completion primitive ---------------------------------------------------------------------

def test_every_backend_has_the_same_interface_and_no_capability_flag():
    from app.backends.base import Backend
    from app.backends.celery import CeleryBackend
    from app.backends.local import LocalBackend
    from ui_support import ScriptedBackend

    abstract = set(Backend.__abstractmethods__)
    assert {"stream", "health", "model_gauges", "classify", "answer", "score"} <= abstract
    assert "complete" not in abstract  # derived once, in the base, from stream
    for cls in (LocalBackend, CeleryBackend, ScriptedBackend):
        assert not cls.__abstractmethods__, cls
        assert "complete" not in cls.__dict__, f"{cls.__name__} writes its own complete()"
        assert not hasattr(cls, "admits_clients")


def test_complete_is_the_stream_without_partials(tiny_gpt2):
    """Non-streaming completion asks the one primitive for no partials and returns its answer."""
    from app.backends.local import LocalBackend

    backend = LocalBackend([f"tiny={tiny_gpt2}"], device="cpu", slots=8)
    try:
        asked = []
        real = backend.stream

        def spy(request, **kwargs):
            asked.append(kwargs["partials"])
            return real(request, **kwargs)

        backend.stream = spy
        request = CompletionRequest("Once upon a time", model="tiny", n=2, max_new_tokens=6, seed=4)
        done = backend.complete(request)
        events = list(real(request))
        assert asked == [False]
        assert events[-1]["type"] == "done"
        streamed = [s["text"] for s in events[-1]["result"]["suggestions"]]
        assert [s.text for s in done.suggestions] == streamed
        engine = backend.engine("tiny")
        assert not any(e.get("type") == "partial" for e in real(request, partials=False))
        assert engine.scheduler.waiting() == 0
    finally:
        backend.close()


# -- one place for errors -------------------------------------------------------------------------

def test_a_bug_is_logged_for_the_operator_and_read_plainly_by_the_caller(caplog):
    import logging

    log = logging.getLogger("wwt.test")
    try:
        raise KeyError("secret internals at 10.0.0.7:6379")
    except KeyError as e:
        with caplog.at_level(logging.ERROR, logger="wwt.test"):
            error = caller_error(e, log, "request")
    found = re.fullmatch(r"internal error \(KeyError\); the app is still running, try again \(ref ([0-9a-f]{8})\)",
                         error.message)
    assert found, error.message
    assert "10.0.0.7" not in error.text_for(VISITOR) and "Traceback" not in error.text_for(VISITOR)
    logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert logged and "secret internals" in (logged[0].exc_text or ""), "the operator's log has the bug, by its ref"


def test_redis_down_names_its_address_to_the_operator_only():
    from app.backends.celery import CeleryBackend

    backend = CeleryBackend(["tiny"], redis_url="redis://:pw@127.0.0.1:1/0", timeout=5)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            backend.complete(CompletionRequest("Hi", model="tiny"))
        error = caught.value
        assert "127.0.0.1" not in error.text_for(VISITOR) and "cannot reach Redis" in error.text_for(VISITOR)
        assert re.search(r"\(ref [0-9a-f]{8}\)$", error.message), error.message  # the log line's reference
        assert "redis://:***@127.0.0.1:1/0" in error.text_for(OPERATOR) and "pw" not in error.text_for(OPERATOR)
        health = backend.health()
        assert health["ready"] is False and "127.0.0.1" not in json.dumps(health)
        events = list(backend.stream(CompletionRequest("Hi", model="tiny")))
        assert events[-1]["type"] == "error" and "127.0.0.1" not in json.dumps(events)
    finally:
        backend.close()


def test_an_error_keeps_its_operator_detail_across_the_queue():
    from model.errors import error_from_dict

    error = BackendUnavailable("cannot reach Redis", "cannot reach Redis at redis://h:1/0 (refused)")
    back = error_from_dict(json.loads(json.dumps(error.to_dict())))
    assert type(back) is BackendUnavailable and back.message == "cannot reach Redis"
    assert back.text_for(OPERATOR) == "cannot reach Redis at redis://h:1/0 (refused)"


# -- one answer shape ---------------------------------------------------------------------------

def test_the_stream_and_the_tab_call_answer_in_one_shape(tiny_gpt2):
    """The page reads the stream's done event and the Tab call's answer alike: same keys, same
    suggestions for the same request, and the timing line formatted once, on the server."""
    from app.backends.local import LocalBackend
    from app.web import callbacks
    from ui_support import launch_in_process, post_json

    backend = LocalBackend([f"tiny={tiny_gpt2}"], device="cpu", slots=8)
    demo, url = launch_in_process(backend)
    try:
        body = {"before": "Once upon a time there was", "model": "tiny", "n": 2, "max_new_tokens": 5,
                "temperature": 0}
        status, raw = post_json(url + "wwt/stream", body, timeout=60)
        assert status == 200
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "done"
        streamed = events[-1]["answer"]
        called = callbacks.suggest(backend, body)
        assert set(streamed) == set(called) == {"ok", "model", "ms", "suggestions", "info", "asked"}
        assert streamed["suggestions"] == called["suggestions"] and streamed["asked"] == called["asked"] == 2
        assert streamed["info"].startswith("tiny · ") and " ms" in streamed["info"]
        status, raw = post_json(url + "wwt/stream", {**body, "n": 0}, timeout=60)
        error = json.loads(raw.decode().splitlines()[1][6:])
        assert error["type"] == "error" and error["answer"] == {"ok": False, "error": error["error"]}
        assert callbacks.suggest(backend, {**body, "n": 0}) == error["answer"]
    finally:
        demo.close()
        backend.close()
    editor = (ROOT / "app" / "web" / "static" / "editor.js").read_text()
    assert "tokens decoded" not in editor, "the page formats no timing line of its own"


# -- the code's shape ---------------------------------------------------------------------------

def _imports(path: Path, module: str) -> set[str]:
    """Our modules that `path` imports, at any depth of the file (lazy imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in _production_files():
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_our_modules():
    graph = _module_graph()
    assert "model.serving.engine" in graph["app.backends.local"]  # lazy imports are edges too
    assert "app.bench.speed" in graph["app.cli"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_two_production_modules_share_a_file_name():
    names = defaultdict(list)
    for path in _production_files():
        if path.name != "__init__.py":
            names[path.name].append(path.relative_to(ROOT).as_posix())
    assert {n: p for n, p in names.items() if len(p) > 1} == {}


def test_throwaway_services_ship_with_the_benchmarks_not_the_workers():
    assert not (ROOT / "workers" / "processes.py").exists()
    assert (ROOT / "app" / "bench" / "processes.py").exists()


# -- who the client is ----------------------------------------------------------------------------

def test_client_of_believes_only_trusted_proxies():
    from app.web.client_identity import TrustedProxies, client_of, default_proxies

    trusted = TrustedProxies("127.0.0.2, 10.0.0.0/8")
    xff = lambda value: [(b"x-forwarded-for", value.encode())]  # noqa: E731
    assert client_of("127.0.0.2", xff("198.51.100.7"), trusted) == "198.51.100.7"
    assert client_of("127.0.0.3", xff("198.51.100.7"), trusted) == "127.0.0.3"  # a stranger's header
    assert client_of("127.0.0.2", xff("6.6.6.6, 198.51.100.7, 10.1.2.3"), trusted) == "198.51.100.7"
    assert client_of("127.0.0.2", xff("not-an-address, '; DROP"), trusted) == "127.0.0.2"
    assert client_of("127.0.0.2", xff("198.51.100.7:4711"), trusted) == "198.51.100.7"
    assert client_of("127.0.0.2", [(b"forwarded", b'for="[2001:db8::7]:80";proto=https')], trusted) == "2001:db8::7"
    assert client_of("127.0.0.2", xff("10.9.9.9"), trusted) == "10.9.9.9"  # only proxies: the left-most
    assert client_of("::ffff:127.0.0.3", [], trusted) == "127.0.0.3"
    assert client_of("127.0.0.1", xff("198.51.100.7"), TrustedProxies(default_proxies(False))) == "198.51.100.7"
    assert client_of("10.16.3.80", xff("198.51.100.7"), TrustedProxies(default_proxies(False))) == "10.16.3.80"
    assert client_of("10.16.3.80", xff("198.51.100.7"), TrustedProxies(default_proxies(True))) == "198.51.100.7"
    with pytest.raises(ValueError, match="WWT_TRUSTED_PROXIES"):
        TrustedProxies("127.0.0.1, proxy.example")


def test_a_bad_trusted_proxies_setting_is_one_line(monkeypatch):
    from app.app_config import AppConfig

    monkeypatch.setenv("WWT_TRUSTED_PROXIES", "my-proxy")
    with pytest.raises(settings.SettingError, match="WWT_TRUSTED_PROXIES: 'my-proxy' is not an IP address"):
        AppConfig.from_settings()
    monkeypatch.setenv("WWT_TRUSTED_PROXIES", "")
    monkeypatch.setenv("SPACE_ID", "someone/write-with-transformer")
    assert "10.0.0.0/8" in AppConfig.from_settings().trusted_proxies  # the Spaces proxy, out of the box


def test_every_path_counts_by_the_one_client_identity():
    """Through a trusted proxy (127.0.0.2) the forwarded user is the client of every path; from a
    stranger (127.0.0.3) the same header is ignored."""
    from app.app_config import AppConfig
    from ui_support import ScriptedBackend, http_call, launch_in_process

    backend = ScriptedBackend(models=("m1",))
    demo, url = launch_in_process(backend, AppConfig(trusted_proxies="127.0.0.2"))

    def every_path(source: str, user: str) -> list:
        backend.asked_for.clear()
        headers = {"X-Forwarded-For": f"203.0.113.250, {user}"}
        assert http_call(url + "wwt/stream", "POST", {"before": "Hi", "model": "m1"}, headers, source)[0] == 200
        assert http_call(url + "wwt/doc", "POST", {"text": "a draft"}, headers, source)[0] == 200
        for name, data in (("complete", ["Hi", "m1"]), ("score", ["Hi", "m1"]), ("classify", ["Hi", "", "m1"])):
            status, _, body = http_call(f"{url}gradio_api/call/{name}", "POST", {"data": data}, headers, source)
            assert status == 200, body
            event = json.loads(body)["event_id"]
            assert http_call(f"{url}gradio_api/call/{name}/{event}", headers=headers, source=source)[0] == 200
        return sorted(backend.asked_for)

    try:
        assert every_path("127.0.0.2", "198.51.100.7") == [
            ("classify", "198.51.100.7"), ("complete", "198.51.100.7"), ("complete", "198.51.100.7"),
            ("score", "198.51.100.7"), ("share", "198.51.100.7")]
        assert {client for _, client in every_path("127.0.0.3", "198.51.100.7")} == {"127.0.0.3"}
    finally:
        demo.close()


def test_a_million_non_latin_characters_fit_the_body_limit(tiny_gpt2):
    """The contract's longest text, escaped as JSON does (6 bytes a character), is under the body
    limit: it is answered, not refused 413; one character more is the contract's clear message."""
    from app.backends.local import LocalBackend
    from ui_support import http_call, launch_in_process

    backend = LocalBackend([f"tiny={tiny_gpt2}"], device="cpu", slots=4)
    demo, url = launch_in_process(backend)
    try:
        text = "中" * 1_000_000
        body = json.dumps({"before": text, "model": "tiny", "n": 1, "max_new_tokens": 2}).encode()  # ASCII-escaped
        assert len(body) > 6_000_000
        status, _, out = http_call(url + "wwt/stream", "POST", body, timeout=300)
        events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1]["type"] == "done", (status, out[:300])
        status, _, out = http_call(url + "wwt/stream", "POST", {"before": text + "文", "model": "tiny"}, timeout=300)
        assert status == 200 and "the text has 1,000,001 characters; the limit is 1,000,000" in out.decode()
        emoji = "😀" * 500_001  # two UTF-16 units each, as a browser counts them
        status, _, out = http_call(url + "wwt/stream", "POST", {"before": emoji, "model": "tiny"}, timeout=300)
        assert "the text has 1,000,002 characters" in out.decode()
    finally:
        demo.close()
        backend.close()
