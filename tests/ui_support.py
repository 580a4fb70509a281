"""For the UI tests: `wwt serve` as a real process on a free loopback port, and a scripted Backend."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from app.backends.base import Backend, EventStream
from model.types import Completion, Scores, Suggestion, Timings, TokenScore
from app.bench.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


class Server:
    """`wwt serve --model ... --port P` in a subprocess; its log goes to a file for failure messages."""

    def __init__(self, models: list[str], folder: Path, extra_env: Optional[dict] = None, backend: str = "local",
                 redis_url: Optional[str] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(folder) / f"serve-{self.port}.log"
        self.env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                    "WWT_DATA_DIR": str(Path(folder) / "data"), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.args = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                     "--backend", backend]
        if redis_url:
            self.args += ["--redis-url", redis_url]
        for m in models:
            self.args += ["--model", m]
        self.proc: Optional[subprocess.Popen] = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 120) -> "Server":
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"wwt serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "gradio_api/info", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"wwt serve did not answer within {timeout:g} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log_file", None):
            self._log_file.close()


class ScriptedBackend(Backend):
    """A Backend whose answers (or failures) a test decides; it records every request."""

    kind = "scripted"

    def __init__(self, models=("m1", "m2"), suggestions=("one", "two"), error: Optional[Exception] = None):
        self.names = list(models)
        self.suggestions = list(suggestions)
        self.error = error
        self.requests: list = []
        self.supersede_keys: list = []
        self.asked_for: list = []  # (what was asked, the client it was asked for)
        self.documents: dict[str, str] = {}

    def _maybe_fail(self, request):
        self.requests.append(request)
        if self.error is not None:
            raise self.error

    def models(self):
        return list(self.names)

    def model_info(self, name):
        if self.error is not None:
            raise self.error
        return {"name": name, "parameters": 124_439_808, "loaded": True, "device": "cpu"}

    def stream(self, request, *, client=None, supersede=None, timeout=None, partials=True):
        """The one completion primitive, as every backend has it: here, one done event (or the error)."""
        self.supersede_keys.append(supersede)
        self.asked_for.append(("complete", client))

        def events():
            self._maybe_fail(request)
            yield stream.done(Completion(model=request.model, suggestions=[Suggestion(text=t) for t in self.suggestions],
                                         timings=Timings(total_ms=12.0, decode_ms=10.0, tokens_decoded=8)))

        stream = EventStream(events())
        return stream

    def classify(self, request, timeout=None, client=None):
        self.asked_for.append(("classify", client))
        self._maybe_fail(request)
        raise NotImplementedError

    def answer(self, request, timeout=None, client=None):
        self.asked_for.append(("answer", client))
        self._maybe_fail(request)
        raise NotImplementedError

    def score(self, request, timeout=None, client=None):
        self.asked_for.append(("score", client))
        self._maybe_fail(request)
        return Scores(model=request.model, tokens=[TokenScore("a", 1, 0.5, 0)])

    def health(self):
        ok = self.error is None
        return {"ready": ok, "backend": self.kind, "model": self.names[0],
                **({} if ok else {"reason": str(getattr(self.error, "message", self.error))})}

    def model_gauges(self):
        if self.error is not None:
            raise self.error
        return {name: {"loaded": 1, "queue_depth": 0} for name in self.names}

    def save_document(self, text, client=None):
        self.asked_for.append(("share", client))
        self._maybe_fail(text)
        doc_id = f"doc{len(self.documents):013d}xyz"
        self.documents[doc_id] = text
        return doc_id, f"key-of-{doc_id}"

    def load_document(self, doc_id):
        self._maybe_fail(doc_id)
        return self.documents[doc_id]

    def delete_document(self, doc_id, delete_key):
        self._maybe_fail(doc_id)
        if delete_key != f"key-of-{doc_id}":
            from model.errors import Forbidden

            raise Forbidden("not its key")
        del self.documents[doc_id]


class GatedBackend(ScriptedBackend):
    """A ScriptedBackend whose score() holds every call until release(): calls stay running for as
    long as a test needs (to fill Gradio's queue, say)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.running = 0
        self._lock = threading.Lock()

    def score(self, request, timeout=None, client=None):
        with self._lock:
            self.running += 1
        self.gate.wait(120)
        return Scores(model=request.model, tokens=[TokenScore("a", 1, 0.5, 0)])

    def release(self) -> None:
        self.gate.set()


def launch_in_process(backend: Backend, config=None):
    """The app as `wwt serve` builds it (build_app, app_kwargs, launch_kwargs) for a backend the test
    controls and an AppConfig (default: the registry's defaults), on a free loopback port in this
    process: (demo, url). demo.close() stops it."""
    from app.app_config import AppConfig
    from app.server import app_kwargs, build_app
    from app.web.ui import launch_kwargs

    config = config or AppConfig()
    demo = build_app(backend, config)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                app_kwargs=app_kwargs(backend, config), **launch_kwargs(config.session_capacity, config.mcp))
    return demo, f"http://127.0.0.1:{port}/"


def call_over_http(server: Server, endpoint: str, body) -> tuple[str, object]:
    """Gradio's two-step plain HTTP call of a named endpoint, with the body as given (`{"data":
    [...]}` or anything else): POST it, then read the event stream; (event name, its data)."""
    post = urllib.request.Request(f"{server.url}gradio_api/call/{endpoint}", method="POST",
                                  data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        event_id = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as r:
        lines = r.read().decode().splitlines()
    event = next(line.split(": ", 1)[1] for line in lines if line.startswith("event: "))
    payload = next(line.split(": ", 1)[1] for line in lines if line.startswith("data: "))
    return event, json.loads(payload)


def post_json(url: str, data, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def fill_gradio_queue(url: str, backend: GatedBackend, start_s: float = 5.0) -> int:
    """POST /call/score until a call no longer starts (every concurrent slot is held by the gate) and
    so waits in Gradio's queue. With WWT_QUEUE_MAX_SIZE=1 the queue is then full. -> calls running."""
    from model_support import wait_until

    for i in range(1, 200):
        status, out = post_json(url + "gradio_api/call/score", {"data": [f"call {i}"]})
        assert status == 200, (status, out)
        if not wait_until(lambda: backend.running >= i, timeout=start_s):
            return backend.running
    raise AssertionError("every call started: the queue never filled")


def http_call(url: str, method: str = "GET", body=None, headers: Optional[dict] = None, source: str = "127.0.0.1",
              timeout: float = 60) -> tuple[int, dict, bytes]:
    """One HTTP request from the loopback address `source` (127.0.0.2 stands in for a proxy, 127.0.0.3
    for a stranger): (status, headers in lower case, body). `body` is JSON-encoded unless it is bytes."""
    import http.client

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout, source_address=(source, 0))
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def app_in_mode(mode: str, spec: str, folder: Path, unserved: tuple = ()):
    """The app serving model `spec` ("name=folder") as `wwt serve` builds it, in `mode`: "local"
    (embedded), or "celery" (a password-protected redis-server and one real `wwt worker`).
    `unserved` names more offered models (embedded: specs; distributed: names no worker serves).
    Yields (url, backend); stops everything after."""
    from app.app_config import AppConfig
    from app.backends import make_backend

    started = []
    try:
        if mode == "local":
            config = AppConfig(models=(spec, *unserved), data_dir=str(folder))
        else:
            from dist_support import RedisServer, Worker

            redis_server = RedisServer(folder / "redis").start()
            started.append(redis_server)
            worker = Worker(spec, redis_server.url, folder, concurrency=2, env={"WWT_HEARTBEAT_S": "1"},
                            name=f"{folder.name}-worker").start()
            started.insert(0, worker)
            worker.wait_announced(redis_server.client())
            config = AppConfig(backend="celery", models=(spec.split("=")[0], *unserved), redis_url=redis_server.url,
                               data_dir=str(folder))
        backend = make_backend(config)
        demo, url = launch_in_process(backend, config)
        try:
            yield url, backend
        finally:
            demo.close()
            backend.close()
    finally:
        for thing in started:
            thing.stop()
