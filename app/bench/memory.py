"""RSS of a `wwt serve` process before and after many mixed plain-HTTP requests.

    python -m app.bench.memory [--requests 10000] [--every 2000] [--model tiny=./tiny]
    python -m app.bench.memory --megabyte-calls 300 [--model tiny=./tiny]

Starts `wwt serve` on a free port (a tiny random model unless --model is given), warms it up,
reads its resident memory (VmRSS), sends the requests from 8 threads (/score, /complete and
/classify with small texts, 1 in 20 with a 1 MB text, 1 in 50 with a 5 MB body that is
refused 413), and reads it again. Every --every requests it reads RSS at once and again after
the server has been idle for SETTLE_S (long enough for its heap trims, app/web/call_memory.py), so
growth that goes on can be told from a plateau, and what stays from what a request in flight
holds; the peak is sampled throughout. Prints the figures; asserts nothing.

With --megabyte-calls N it sends N plain-HTTP /complete calls one after another, each with a
1 MB text, and prints RSS (settled) after every 100: what a call leaves behind, by the size of
its input.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .processes import rss_mb, start_server, stop_process

from ..web.call_memory import TRIM_EVERY_S

SETTLE_S = 2 * TRIM_EVERY_S + 1  # the server's last heap trim comes within 2 periods of its last request




def call(url: str, endpoint: str, data: list) -> int:
    body = json.dumps({"data": data}).encode()
    req = urllib.request.Request(f"{url}gradio_api/call/{endpoint}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            event = json.load(r)["event_id"]
    except urllib.error.HTTPError as e:
        return e.code
    except (ConnectionError, urllib.error.URLError):
        return -1
    with urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{event}", timeout=120) as r:
        r.read()
    return 200


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=2000, help="print RSS after each this many requests")
    parser.add_argument("--model", default=None)
    parser.add_argument("--megabyte-calls", type=int, default=0,
                        help="instead: this many sequential /complete calls with a 1 MB text, RSS after each 100")
    args = parser.parse_args(argv)

    proc, url, name = start_server(args.model)
    if args.megabyte_calls:
        try:
            return megabyte_calls(proc, url, name, args.megabyte_calls)
        finally:
            stop_process(proc, 30)
    try:
        big = "The quick brown fox jumps over the lazy dog. " * 22_000  # ~1 MB
        huge = "x" * 5_000_000

        def job(i: int) -> int:
            if i % 50 == 0:
                return call(url, "score", [huge, name])
            text = big if i % 20 == 0 else f"Request number {i} says hello"
            kind = i % 3
            if kind == 0:
                return call(url, "score", [text, name])
            if kind == 1:
                return call(url, "complete", [text, name, 2, 4, 1.0, 0, 0.9, False, i])
            return call(url, "classify", [text, "a, b", name])

        for i in range(40):  # warm-up
            job(i * 3 + 1)
        time.sleep(SETTLE_S)
        before = rss_mb(proc.pid)
        peak = [before]
        running = threading.Event()
        running.set()

        def sample():
            while running.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        codes: list[int] = []
        every = max(1, args.every)
        with ThreadPoolExecutor(8) as pool:
            for first in range(0, args.requests, every):
                codes += pool.map(job, range(first, min(first + every, args.requests)))
                if len(codes) < args.requests:
                    busy = rss_mb(proc.pid)
                    time.sleep(SETTLE_S)
                    print(f"  after {len(codes):>6} requests: RSS {busy:.0f} MB at once, "
                          f"{rss_mb(proc.pid):.0f} MB after {SETTLE_S:g} s idle", flush=True)
        elapsed = time.monotonic() - start
        busy = rss_mb(proc.pid)
        time.sleep(SETTLE_S)
        after = rss_mb(proc.pid)
        running.clear()
        sampler.join()
        counts = {c: codes.count(c) for c in sorted(set(codes))}
        print(f"{args.requests} requests in {elapsed:.1f} s (with {SETTLE_S:g} s idle at each checkpoint), "
              f"status counts {counts} (-1: connection closed by the server, as for each 5 MB body)")
        print(f"RSS warm {before:.0f} MB -> after {after:.0f} MB (+{after - before:.0f} MB) after {SETTLE_S:g} s idle; "
              f"{busy:.0f} MB at once, peak {peak[0]:.0f} MB")
    finally:
        stop_process(proc, 30)
    return 0


def megabyte_calls(proc, url: str, name: str, calls: int) -> int:
    """Sequential /complete calls with a 1 MB text: RSS (after SETTLE_S idle) every 100 calls."""
    big = "The quick brown fox jumps over the lazy dog. " * 22_000  # ~1 MB
    for i in range(5):  # warm-up
        call(url, "complete", [big, name, 1, 2, 1.0, 0, 0.9, False, i])
    time.sleep(SETTLE_S)
    figures = [(0, rss_mb(proc.pid))]
    print(f"  warm: RSS {figures[0][1]:.0f} MB", flush=True)
    for i in range(1, calls + 1):
        status = call(url, "complete", [big, name, 1, 2, 1.0, 0, 0.9, False, i])
        if status != 200:
            print(f"  call {i}: HTTP {status}", flush=True)
        if i % 100 == 0 or i == calls:
            time.sleep(SETTLE_S)
            figures.append((i, rss_mb(proc.pid)))
            print(f"  after {i} calls: RSS {figures[-1][1]:.0f} MB (+{figures[-1][1] - figures[-2][1]:.0f} MB "
                  f"over the last {i - figures[-2][0]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
