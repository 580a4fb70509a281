"""A process that used the engine exits cleanly: status 0, no abort message from the runtime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ABORT = "terminate called"


def _run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.mark.parametrize("attempt", range(3))
def test_wwt_complete_exits_zero(tiny_gpt2, attempt):
    wwt = shutil.which("wwt")
    args = [wwt] if wwt else [sys.executable, "-m", "app.cli"]
    done = _run(args + ["complete", "--model", f"tiny={tiny_gpt2}", "--num", "2", "Hello there"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert ABORT not in done.stderr
    assert "Hello there" in done.stdout


@pytest.mark.parametrize("pending", [False, True])
def test_a_script_that_builds_an_engine_and_returns_exits_zero(tiny_gpt2, pending):
    """Also with a request still decoding when the script returns (its thread is stopped first)."""
    script = textwrap.dedent(f"""
        from model import Engine
        from model.types import CompletionRequest

        def main():
            engine = Engine.from_pretrained({str(tiny_gpt2)!r}, slots=4)
            print(engine.complete(CompletionRequest(text="Once upon a time", n=2, max_new_tokens=4, seed=1))
                  .suggestions[0].text != None)
            if {pending}:
                engine.submit(CompletionRequest(text="A long story", n=2, max_new_tokens=100, stop=None))

        main()
    """)
    done = _run([sys.executable, "-c", script])
    assert done.returncode == 0, done.stderr[-2000:]
    assert ABORT not in done.stderr
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_wwt_serve_exits_zero_on_sigterm_and_ctrl_c(tiny_gpt2, tmp_path, sig):
    import signal

    from ui_support import Server

    server = Server([f"tiny={tiny_gpt2}"], tmp_path).start()
    try:
        server.proc.send_signal(getattr(signal, sig))
        code = server.proc.wait(30)
    finally:
        server.stop()
    assert code == 0, server.log()[-3000:]
    assert ABORT not in server.log()
    assert "Traceback" not in server.log()


@pytest.mark.redis
def test_wwt_worker_exits_zero_on_sigterm(tiny_gpt2, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the CI script installs it)")
    from app.bench.processes import RedisServer, WorkerProcess

    with RedisServer(tmp_path) as redis_server:
        worker = WorkerProcess(f"tiny={tiny_gpt2}", redis_server.url, tmp_path).start()
        try:
            worker.wait_announced(redis_server.client())
            worker.proc.terminate()
            code = worker.proc.wait(60)
        finally:
            worker.stop()
    assert code == 0, worker.logs()
    assert ABORT not in worker.logs()
