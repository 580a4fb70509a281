"""Real services as child processes: a password-protected redis-server and `wwt worker`
processes, each on free loopback ports, started and stopped by whoever needs them.

One set of helpers for the queue benchmark (`app/bench/queue_path.py`) and the distributed
tests (`tests/dist_support.py`), so both start Redis and workers the same way.

    with RedisServer(folder) as server, WorkerProcess("tiny=./tiny", server.url, folder) as worker:
        ...  # the worker has announced its model: requests to its queue are answered
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

# A benchmark measures how fast an engine is with every request let in: the pace bound would refuse
# some of its concurrent callers as busy. A worker process is configured as any user would: by variable.
# (An engine built in the benchmark's own process takes EngineConfig.from_settings().unbounded() instead.)
LET_EVERYTHING_IN = {"WWT_MAX_WAIT_S": "0"}

__all__ = ["LET_EVERYTHING_IN", "RedisServer", "WorkerProcess", "free_port", "rss_mb", "start_server", "stop_process", "wait_for"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    """Poll until `predicate()` is truthy and return its value; TimeoutError naming `what` after
    `timeout` seconds. An exception from `predicate` ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(every)


def stop_process(proc: Optional[subprocess.Popen], grace: float, sig: int = signal.SIGTERM) -> None:
    """`sig` (SIGTERM), then SIGKILL if the process is still there after `grace` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """Debian's redis-server on a free loopback port with a random password, no persistence.

    Its data and log live in `folder`; stop() then start() keeps the port and the password
    (the data is gone), which is how a test takes Redis away and brings it back."""

    def __init__(self, folder, password: Optional[str] = None, appendonly: bool = False):
        """`appendonly`: keep an append-only file as the compose file's Redis does, so a restart
        (stop, then start) keeps the data."""
        self.appendonly = appendonly
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password or secrets.token_hex(8)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.folder / "redis.log"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def start(self, timeout: float = 20) -> "RedisServer":
        import redis

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                 "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.folder)],
                stdout=log, stderr=subprocess.STDOUT)
        client = self.client()

        def up():
            try:
                return client.ping()
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}") from None
                return False

        try:
            wait_for(up, timeout, "redis-server to answer PING")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerProcess:
    """One `wwt worker` process (`python -m app.cli worker`) serving one model spec on CPU.

    Its output goes to a log file in `log_dir`. `env` is added to this process's environment;
    OMP_NUM_THREADS is `threads` (None: inherited)."""

    def __init__(self, spec: str, redis_url: str, log_dir, concurrency: int = 2, env: Optional[dict] = None,
                 name: str = "worker", threads: Optional[int] = 1, device: str = "cpu", cwd=None,
                 slots: Optional[int] = None):
        self.spec, self.redis_url, self.concurrency, self.device, self.cwd = spec, redis_url, concurrency, device, cwd
        self.slots = slots  # KV-cache slots of its engine; None: the engine's default
        self.model = spec.split("=", 1)[0]
        self.log_path = Path(log_dir) / f"{name}-{secrets.token_hex(3)}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "WorkerProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--model", self.spec, "--redis-url", self.redis_url,
                 "--concurrency", str(self.concurrency), "--device", self.device]
                + (["--slots", str(self.slots)] if self.slots else []),
                cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def node(self) -> str:
        """The Celery node name the worker picks when WWT_WORKER_NAME is unset (<queue>-<pid>@<host>)."""
        from workers.queues import queue_name

        return f"{queue_name(self.model)}-{self.pid}@{socket.gethostname()}"

    def logs(self, last: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-last:] if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_announced(self, client, timeout: float = 60) -> "WorkerProcess":
        """Until this process has announced its model in Redis (it has loaded it and consumes its queue)."""
        from workers.registry import live_workers

        def announced():
            if not self.alive():
                raise RuntimeError(f"worker {self.spec} exited with {self.proc.returncode}:\n{self.logs()}")
            return any(w.get("pid") == self.pid for w in live_workers(client, self.model))

        wait_for(announced, timeout, f"worker {self.spec} to announce itself", every=0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, nothing acknowledged, the announcement left to expire."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace: float = 15) -> None:
        """SIGTERM (a warm shutdown), SIGKILL after `grace` seconds."""
        stop_process(self.proc, grace)

    def __enter__(self) -> "WorkerProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model, args: tuple = (), env: Optional[dict] = None, folder: Optional[Path] = None):
    """A throwaway `wwt serve` (the tiny model unless `model` names one) with more `args` and `env`:
    (process, url, the offered model's name)."""
    root = Path(__file__).resolve().parents[2]
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="wwt-load-"))
    if model is None:
        subprocess.run([sys.executable, "-m", "app.cli", "make-tiny-model", str(folder / "tiny")], check=True,
                       cwd=root, stdout=subprocess.DEVNULL)
        model = f"tiny={folder / 'tiny'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WWT_DATA_DIR": str(folder / "data"),
           "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    log = open(folder / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--model", model, *args],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "gradio_api/info", timeout=2).read()
            return proc, url, model.split("=")[0].split("@")[0]
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.terminate()
                raise SystemExit((folder / "serve.log").read_text()[-3000:])
            time.sleep(0.3)
