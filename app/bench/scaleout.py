"""Many writers over 1 and 3 workers: does prefix reuse survive scaling out?

    python -m app.bench.scaleout [--workers 1,3] [--writers 12] [--interval 2] [--slots 8] [--seconds 20]

Starts a throwaway password-protected redis-server and `wwt worker` processes (the helpers of
the distributed tests, app/bench/processes.py) for a random model of gpt2's layout (6 layers,
384 wide, 1,024 positions; `--model` names another spec) with `--slots` KV-cache slots each
(more writers than one worker holds documents: the case scaling out is for), then lets
`--writers` people type
at once through the CeleryBackend: each has a document of its own (about 100 words to start
with) and adds a word after pauses of `--interval` seconds on average (random, exponential:
a fixed mean rate), open loop (a request leaves at its time whether or not the earlier ones
were answered). Each worker gets one CPU thread.

For each run (k workers with routing by document, and, for the largest k, the same without
it: WWT_AFFINITY=0) it prints the keystrokes sent and answered, refusals and errors, the
prefix-reuse rate (tokens read from the KV cache over the prompt's tokens, keystrokes after
each writer's first) and the share of those keystrokes that kept their prefix (read at least
half of their prompt from the cache), keystroke latency
p50/p95 (scheduled send to answer), and how the keystrokes spread over the workers.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from .load import WORDS, percentile

ROOT = Path(__file__).resolve().parents[2]


def opening(rng: random.Random, writer: int) -> str:
    return f"Letter {writer}. " + " ".join(rng.choice(WORDS) for _ in range(100))


def run(backend, model: str, writers: int, interval: float, seconds: float) -> dict:
    """Open-loop typing by `writers` people; one result dict."""
    from model.types import CompletionRequest

    rng = random.Random(7)
    texts = [opening(rng, w) for w in range(writers)]
    results: list[dict] = []
    lock = threading.Lock()
    threads = []
    t0 = time.monotonic() + 0.5
    keystrokes = int(seconds / interval)

    def send(at: float, writer: int, step: int, text: str) -> None:
        request = CompletionRequest(text=text, model=model, n=2, max_new_tokens=8, stop=None, seed=step,
                                    fresh=True)  # a new text each time: the suggestion cache never answers
        outcome = {"writer": writer, "step": step}
        try:
            got = backend.complete(request, timeout=60)
            t = got.timings
            outcome.update(ok=True, reused=t.tokens_reused, prefilled=t.tokens_prefilled, worker=t.worker)
        except Exception as e:  # counted and shown, never raised: this is a measurement
            outcome.update(ok=False, kind=getattr(e, "kind", e.__class__.__name__), message=str(e)[:120])
        outcome["latency"] = time.monotonic() - at
        with lock:
            results.append(outcome)

    # Each writer's pauses are random (exponential, mean `interval`): people do not type in lockstep,
    # and a fixed cycle would let the queue's round robin keep a document on one worker by chance.
    schedule = []
    for writer in range(writers):
        at = t0 + rng.uniform(0, interval)
        for step in range(keystrokes):
            schedule.append((at, writer, step))
            at += rng.expovariate(1 / interval)
    schedule.sort()
    for at, writer, step in schedule:
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        text = texts[writer] + "".join(" " + WORDS[(writer + i) % len(WORDS)] for i in range(step + 1))
        th = threading.Thread(target=send, args=(at, writer, step, text), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(90)
    ok = [r for r in results if r.get("ok")]
    later = [r for r in ok if r["step"] > 0]
    reused = sum(r["reused"] for r in later)
    prompt = sum(r["reused"] + r["prefilled"] for r in later)
    latency = [r["latency"] for r in ok]
    return {"sent": len(schedule), "ok": len(ok),
            "busy": sum(1 for r in results if not r.get("ok") and r.get("kind") == "busy"),
            "errors": [r["message"] for r in results if not r.get("ok") and r.get("kind") != "busy"],
            "reuse": reused / prompt if prompt else float("nan"),
            # a keystroke "kept its prefix" when most of its prompt came from the cache (documents share
            # their first word, so any reuse at all says little)
            "kept": sum(1 for r in later if r["reused"] >= r["prefilled"]) / len(later) if later else float("nan"),
            "p50": percentile(latency, 0.5), "p95": percentile(latency, 0.95),
            "spread": sorted(Counter(r["worker"] for r in ok).values(), reverse=True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wwt loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,3", help="worker counts to run, comma-separated")
    parser.add_argument("--writers", type=int, default=12)
    parser.add_argument("--interval", type=float, default=2.0,
                        help="mean seconds between one writer's keystrokes")
    parser.add_argument("--slots", type=int, default=8,
                        help="per worker: N rows and a KV cache of N x 1024 positions")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each run types")
    parser.add_argument("--model", default=None, help="a model spec name=folder (default: a random one)")
    args = parser.parse_args(argv)

    from app.backends.celery import CeleryBackend
    from model.network.tiny import make_tiny_model
    from app.bench.processes import RedisServer, WorkerProcess

    folder = Path(tempfile.mkdtemp(prefix="wwt-scaleout-"))
    if args.model:
        spec = args.model
    else:
        make_tiny_model(folder / "model", "gpt2", seed=5, n_positions=1024, n_embd=384, n_layer=6, n_head=6,
                        vocab_size=2000)
        spec = f"writers={folder / 'model'}"
    name = spec.split("=", 1)[0].split("@")[0]
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    runs = [(k, True) for k in counts] + [(max(counts), False)]
    print(f"{args.writers} writers, a keystroke each every {args.interval:g} s on average "
          f"({args.writers / args.interval:g} req/s, open loop) for {args.seconds:g} s per run; "
          f"--slots {args.slots} per worker ({args.slots} rows, {args.slots} x 1024 KV positions); model {spec}", flush=True)
    with RedisServer(folder / "redis") as redis_server:
        for k, routed in runs:
            client = redis_server.client()
            client.flushdb()
            workers = [WorkerProcess(spec, redis_server.url, folder, concurrency=4, name=f"w{i}", threads=1,
                                     cwd=ROOT, slots=args.slots).start() for i in range(k)]
            backend = CeleryBackend([spec], redis_url=redis_server.url, timeout=60, cache=False, affinity=routed)
            try:
                for w in workers:
                    w.wait_announced(client, timeout=180)
                r = run(backend, name, args.writers, args.interval, args.seconds)
            finally:
                backend.close()
                for w in workers:
                    w.stop()
            print(f"{k} worker{'s' if k > 1 else ''}, {'routed by document' if routed else 'no routing'}: "
                  f"sent {r['sent']}, answered {r['ok']}, busy {r['busy']}, errors {len(r['errors'])}"
                  f"{' ' + repr(r['errors'][:2]) if r['errors'] else ''}; prefix reuse {r['reuse']:.1%} of "
                  f"prompt tokens, {r['kept']:.0%} of later keystrokes kept their prefix; keystroke p50 "
                  f"{r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms; per worker {r['spread']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
