"""Real services for the distributed tests: a password-protected redis-server and `wwt worker`
processes, each on free loopback ports, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import redis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    """Poll until `predicate()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(every)


class RedisServer:
    """Debian's redis-server on a free port with a password; stop() and start() keep the port."""

    def __init__(self, folder: Path, password: Optional[str] = None):
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

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> "RedisServer":
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT)

        def up():
            try:
                return self.client().ping()
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
                return False

        wait_for(up, 20, "redis-server to answer PING")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Worker:
    """One `wwt worker` process (python -m app.cli worker) serving one model spec."""

    def __init__(self, spec: str, redis_url: str, log_dir: Path, concurrency: int = 2,
                 env: Optional[dict] = None, name: str = "worker"):
        self.spec, self.redis_url, self.concurrency = spec, redis_url, concurrency
        self.log_path = Path(log_dir) / f"{name}-{secrets.token_hex(3)}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Worker":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--model", self.spec, "--redis-url", self.redis_url,
             "--concurrency", str(self.concurrency), "--device", "cpu"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def node(self) -> str:
        """The Celery node name the worker picks (<queue>-<pid>@<host>)."""
        from workers.config import queue_name

        model = self.spec.split("=", 1)[0]
        return f"{queue_name(model)}-{self.pid}@{socket.gethostname()}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_announced(self, client: redis.Redis, timeout: float = 60) -> None:
        from workers.registry import live_workers

        model = self.spec.split("=", 1)[0]

        def announced():
            if not self.alive():
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.logs()}")
            return any(w.get("node") == self.node() for w in live_workers(client, model))

        wait_for(announced, timeout, f"worker {self.spec} to announce itself", every=0.1)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, nothing acknowledged, the announcement left to expire."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()


def worker_stats(client: redis.Redis, node: str) -> dict:
    """Task counters a worker keeps in Redis: started, done, failed."""
    from workers.tasks import WORKER_STATS_PREFIX

    raw = client.hgetall(WORKER_STATS_PREFIX + node)
    return {k.decode(): int(v) for k, v in raw.items()}


def total_tasks(client: redis.Redis) -> int:
    """Tasks started by any worker so far."""
    from workers.tasks import STATS_KEY

    return int(client.hget(STATS_KEY, "started") or 0)
