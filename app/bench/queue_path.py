"""What the queue costs: one suggestion request through Redis and a Celery worker, against the
same request to an engine in this process, and what a suggestion-cache hit costs.

A report, not a test: `python -m app.bench.queue_path [--model-dir DIR] [--redis-url URL]`, or
`bench_queue(...)` from the `wwt bench` report. Without a Redis URL a throwaway
redis-server is started on a free loopback port (Debian package redis-server); Redis and the
worker are started with the same helpers as the distributed tests (app/bench/processes.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from app.bench.processes import LET_EVERYTHING_IN, RedisServer, WorkerProcess

TEXT = ("The history of the written word is long. People wrote on clay, then on papyrus, then on paper, "
        "and now they write on screens that")


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was really measured."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "p95": _pct(values, 95), "n": len(values)}


@contextlib.contextmanager
def _redis(url: Optional[str], folder: str):
    """The given Redis, or a password-protected throwaway one (its files in `folder`)."""
    if url:
        yield url
        return
    with RedisServer(folder) as server:
        yield server.url


def bench_queue(redis_url: Optional[str], model_dir: str, repeats: int = 20, threads: Optional[int] = None,
                n: int = 3, max_new_tokens: int = 8) -> dict:
    """Median and p95 latency of one suggestion request (n suggestions x max_new_tokens):
    embedded, through the queue, their difference; and of exact and incremental cache hits."""
    import torch

    from model import Engine
    from model.serving.engine_config import EngineConfig
    from model.types import CompletionRequest

    from app.backends.celery import CeleryBackend

    if threads:
        torch.set_num_threads(threads)
    name = f"bench-{secrets.token_hex(3)}"  # never collides with a real model's queue
    spec = f"{name}={Path(model_dir).resolve()}"
    embedded, queued, exact, incremental = [], [], [], []
    with tempfile.TemporaryDirectory() as folder, _redis(redis_url, folder) as url, \
            WorkerProcess(spec, url, folder, concurrency=1, name="bench", threads=threads,
                          env=LET_EVERYTHING_IN) as worker:
        import redis

        with redis.Redis.from_url(url) as client:
            worker.wait_announced(client, timeout=300)
        engine = Engine.from_pretrained(spec, device="cpu", config=EngineConfig.from_settings().with_(slots=None).unbounded())
        backend = CeleryBackend([name], redis_url=url, timeout=120)
        try:
            def request(i: int, **kw) -> CompletionRequest:
                # Same texts in the same order on both paths, so both engines reuse prefixes alike.
                return CompletionRequest(text=f"{TEXT} {i}", model=name, n=n, max_new_tokens=max_new_tokens,
                                         seed=abs(i), stop=None, **kw)

            for i in range(-3, 0):  # warm both paths up: connections, allocations, first batches
                engine.complete(request(i))
                backend.complete(request(i, fresh=True))
            answers = []
            for i in range(repeats):
                order = ("engine", "queue") if i % 2 == 0 else ("queue", "engine")  # no path always goes first
                for path in order:
                    t = time.perf_counter()
                    if path == "engine":
                        engine.complete(request(i))
                        embedded.append((time.perf_counter() - t) * 1000)
                    else:
                        answers.append(backend.complete(request(i, fresh=True)))
                        queued.append((time.perf_counter() - t) * 1000)
            for i, answer in enumerate(answers):
                t = time.perf_counter()
                hit = backend.complete(request(i))
                exact.append((time.perf_counter() - t) * 1000)
                assert hit.timings.source == "cache", hit.timings.source
                longest = max(answer.suggestions, key=lambda s: len(s.text)).text
                if len(longest) >= 2:
                    typed = CompletionRequest(text=f"{TEXT} {i}{longest[0]}", model=name, n=n,
                                              max_new_tokens=max_new_tokens, seed=abs(i), stop=None)
                    t = time.perf_counter()
                    hit = backend.complete(typed)
                    if hit.timings.source == "cache-incremental":
                        incremental.append((time.perf_counter() - t) * 1000)
        finally:
            backend.close()
            engine.close()
    emb, que = _summary(embedded), _summary(queued)
    return {
        "request": {"n": n, "max_new_tokens": max_new_tokens, "text_chars": len(TEXT) + 3, "repeats": repeats},
        "embedded_ms": emb,
        "queue_ms": que,
        # Paired: the same request on both paths, one right after the other.
        "overhead_ms": _summary([q - e for q, e in zip(queued, embedded)]),
        "cache_hit_ms": _summary(exact),
        "cache_incremental_ms": _summary(incremental) if incremental else None,
    }


def format_report(result: dict) -> str:
    def row(label, s):
        return f"  {label:<34} {s['median']:8.2f} ms median {s['p95']:8.2f} ms p95" if s else f"  {label:<34} n/a"

    r = result["request"]
    lines = [f"queue path: one request, {r['n']} suggestions x {r['max_new_tokens']} tokens, "
             f"{r['repeats']} repeats",
             row("embedded (engine in this process)", result["embedded_ms"]),
             row("through Redis + a Celery worker", result["queue_ms"]),
             row("overhead of the queue (paired)", result["overhead_ms"]),
             row("suggestion cache, exact hit", result["cache_hit_ms"]),
             row("suggestion cache, typing along", result["cache_incremental_ms"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="a checkpoint folder; default: a tiny random one")
    p.add_argument("--redis-url", default=None, help="default: a throwaway redis-server")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = args.model_dir
        if model_dir is None:
            from model.network.tiny import make_tiny_model

            model_dir = str(make_tiny_model(folder, "gpt2"))
        result = bench_queue(args.redis_url, model_dir, args.repeats, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
