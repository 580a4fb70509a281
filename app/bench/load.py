"""Open-loop load on /complete: a constant arrival rate, whatever the server's answers take.

    python -m app.bench.load [--rates 2,10] [--seconds 20] [--url http://host:port/ | --model tiny=./tiny]

Without --url, starts `wwt serve` on a free port (a tiny random model unless --model is given).
Each request is sent at its scheduled time (t0 + i / rate) on its own thread, whether or not
the earlier ones have been answered (open loop: a slow server meets the same arrivals), through
Gradio's plain-HTTP API (POST /gradio_api/call/complete, then its result stream), with a mix of
documents: short (a few words), medium (~200 words) and long (~800 words).

Prints per rate: requests sent, answered, throughput, p50/p95/p99 latency of the accepted ones
(scheduled send to answer) and the p95 of the engine's own part of it (the answers' timings),
refusals ("busy", queue full) and errors, and the server's RSS before/after (when it started the server, or --pid names it). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .processes import rss_mb, start_server, stop_process


WORDS = ("the weather in the valley turned cold that night and snow covered the roofs while people "
         "walked home slowly talking about what the morning would bring").split()


def document(rng: random.Random) -> str:
    words = rng.choice((5, 200, 800))
    return " ".join(rng.choice(WORDS) for _ in range(words))


def one(url: str, model: str, text: str, seed: int) -> tuple[str, str]:
    """(outcome, detail): outcome is ok, refused or error; for ok, detail is the answer's JSON."""
    body = json.dumps({"data": [text, model, 2, 8, 1.0, 0, 0.9, False, seed]}).encode()
    req = urllib.request.Request(f"{url}gradio_api/call/complete", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            event = json.load(r)["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/complete/{event}", timeout=120) as r:
            stream = r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace")[:200]
        return ("refused" if e.code in (429, 503) or "queue is full" in detail.lower() else "error"), detail
    except Exception as e:  # connection refused, timeout
        return "error", f"{e.__class__.__name__}: {e}"
    if "event: complete" in stream:
        return "ok", stream.split("data:", 1)[-1].strip()
    detail = stream.split("data:", 1)[-1].strip()[:200]
    return ("refused" if "busy" in detail.lower() or "queue is full" in detail.lower() else "error"), detail


def engine_seconds(answer: str) -> float:
    """The engine's own time for an answer (from submission to its slots, to the last token), or
    nan: the rest of a request's latency is HTTP, Gradio's queue and the app."""
    try:
        return json.loads(answer)[0]["timings"]["total_ms"] / 1000
    except (ValueError, LookupError, TypeError):
        return float("nan")


def refusal_reason(detail: str) -> str:
    """Which bound refused a request, from its message."""
    text = detail.lower()
    for phrase, reason in (("of your requests", "per client"), ("behind", "work ahead"),
                           ("queue is full", "app queue"), ("waiting for", "waiting list")):
        if phrase in text:
            return reason
    return "other"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_rate(url: str, model: str, rate: float, seconds: float, pid=None) -> dict:
    rng = random.Random(int(rate * 1000))
    before = rss_mb(pid) if pid else float("nan")
    results: list[tuple[str, float, str]] = []
    engine_s: list[float] = []  # the engine's own time for each answered request (Timings.total_ms)
    lock = threading.Lock()
    threads = []
    total = int(rate * seconds)
    t0 = time.monotonic()

    def send(at: float, text: str, seed: int) -> None:
        outcome, detail = one(url, model, text, seed)
        with lock:
            results.append((outcome, time.monotonic() - at, detail))
            if outcome == "ok":
                engine_s.append(engine_seconds(detail))

    for i in range(total):
        at = t0 + i / rate
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=send, args=(at, document(rng), i), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(180)
    elapsed = time.monotonic() - t0
    after = rss_mb(pid) if pid else float("nan")
    ok = [lat for outcome, lat, _ in results if outcome == "ok"]
    refused = [lat for outcome, lat, _ in results if outcome == "refused"]
    reasons: dict[str, int] = {}
    for outcome, _, detail in results:
        if outcome == "refused":
            reasons[refusal_reason(detail)] = reasons.get(refusal_reason(detail), 0) + 1
    errors = [detail for outcome, _, detail in results if outcome == "error"]
    return {"rate": rate, "sent": total, "ok": len(ok), "throughput": len(ok) / elapsed,
            "p50": percentile(ok, 0.5), "p95": percentile(ok, 0.95), "p99": percentile(ok, 0.99),
            "engine_p95": percentile([s for s in engine_s if not math.isnan(s)], 0.95),
            "refused": len(refused), "reasons": reasons, "refusal_p95": percentile(refused, 0.95), "errors": len(errors),
            "error_sample": errors[:2], "rss_before": before, "rss_after": after}




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wwt loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2,10", help="arrival rates in requests per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each rate is offered")
    parser.add_argument("--url", default=None, help="a running server (else one is started)")
    parser.add_argument("--model", default=None, help="the model to ask (with --url) or to serve")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    args = parser.parse_args(argv)
    proc = None
    if args.url:
        url, model, pid = args.url.rstrip("/") + "/", args.model or "", args.pid
    else:
        proc, url, model = start_server(args.model)
        pid = proc.pid
    try:
        for _ in range(5):  # warm-up
            one(url, model, "Hello there", 0)
        for rate in (float(r) for r in args.rates.split(",") if r.strip()):
            r = run_rate(url, model, rate, args.seconds, pid)
            print(f"{rate:g} req/s for {args.seconds:g} s: sent {r['sent']}, answered {r['ok']} "
                  f"({r['throughput']:.2f}/s); latency p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, "
                  f"p99 {r['p99']:.2f} s (in the engine p95 {r['engine_p95']:.2f} s); "
                  f"refused {r['refused']} (p95 {r['refusal_p95']:.3f} s; {r['reasons']}); "
                  f"errors {r['errors']}{' ' + repr(r['error_sample']) if r['errors'] else ''}; "
                  f"RSS {r['rss_before']:.0f} -> {r['rss_after']:.0f} MB", flush=True)
            time.sleep(2)  # let the previous rate drain
    finally:
        if proc is not None:
            stop_process(proc, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
