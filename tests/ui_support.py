"""For the UI tests: `wwt serve` as a real process on a free loopback port, and a scripted Backend."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from app.backends.base import Backend
from model.types import Completion, Suggestion, Timings
from workers.processes import free_port

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

    def complete(self, request, timeout=None, supersede=None):
        self.supersede_keys.append(supersede)
        self._maybe_fail(request)
        return Completion(model=request.model, suggestions=[Suggestion(text=t) for t in self.suggestions],
                          timings=Timings(total_ms=12.0, decode_ms=10.0, tokens_decoded=8))

    def classify(self, request, timeout=None):
        self._maybe_fail(request)
        raise NotImplementedError

    def answer(self, request, timeout=None):
        self._maybe_fail(request)
        raise NotImplementedError

    def score(self, request, timeout=None):
        self._maybe_fail(request)
        raise NotImplementedError

    def save_document(self, text, client=None):
        self._maybe_fail(text)
        doc_id = f"doc{len(self.documents):013d}xyz"
        self.documents[doc_id] = text
        return doc_id

    def load_document(self, doc_id):
        self._maybe_fail(doc_id)
        return self.documents[doc_id]

    def delete_document(self, doc_id):
        self._maybe_fail(doc_id)
        del self.documents[doc_id]
