"""`wwt soak`: the distributed stack under mixed traffic for minutes, with a worker killed and Redis
restarted on the way: does every request get exactly one reply, and is no shared document lost?

The stack is started as it is deployed: redis-server with a password and an append-only file (as
the compose file configures it), two `wwt worker` processes for one model, and
`wwt serve --backend celery`. Open-loop traffic at a fixed rate (the next request does not wait
for the last): keystrokes of many documents on the editor's route (each adds a word to its
document), Compare and classify through Gradio's queue, and shares, from many users behind the
app's trusted loopback proxy (each with its own X-Forwarded-For, so the per-client bounds count
per user). At --kill-at of the run one worker gets SIGKILL; at --restart-at Redis is stopped and
started again on the same port.

Reported: requests sent, answered, refused (busy, a limit) and failed, by reason; how many got
no reply or more than one; every shared document read back at the end; RSS of the app and of
the surviving worker after the warm-up and at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .processes import RedisServer, WorkerProcess, rss_mb, start_server, stop_process

WORDS = ("the river bends past the old mill where children watch boats drift slowly toward the sea while "
         "a quiet town wakes and bakers open their doors to the morning light").split()
MIX = (("keystroke", 0.7), ("compare", 0.1), ("classify", 0.1), ("share", 0.1))
TIMEOUT_S = 90.0


def _call(url: str, method: str = "GET", body=None, headers=None, timeout: float = TIMEOUT_S):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _events(raw: bytes) -> list[tuple[str, str]]:
    """(event name, data) of a Server-Sent Events body."""
    out, name = [], None
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name or "message", line[6:]))
            name = None
    return out


class Traffic:
    """The requests of the soak and what became of each: (kind, outcome, reason, replies)."""

    def __init__(self, url: str, model: str, documents: int, users: int, seed: int):
        self.url, self.model = url, model
        self.rng = random.Random(seed)
        self.texts = [f"Story {i}: " + " ".join(self.rng.sample(WORDS, 6)) for i in range(documents)]
        self.users = [f"198.51.{100 + i // 250}.{i % 250 + 1}" for i in range(users)]
        self.lock = threading.Lock()
        self.results: list[tuple[str, str, str, int]] = []
        self.shared: dict[str, str] = {}  # id -> text, to read back at the end

    def record(self, kind: str, outcome: str, reason: str, replies: int) -> None:
        with self.lock:
            self.results.append((kind, outcome, reason, replies))

    def one(self, kind: str, i: int) -> None:
        user = self.users[i % len(self.users)]
        headers = {"X-Forwarded-For": user}
        try:
            getattr(self, kind)(i, headers)
        except Exception as e:  # no reply at all (a timeout, a refused connection)
            self.record(kind, "failed", f"no reply: {e.__class__.__name__}", 0)

    def keystroke(self, i: int, headers: dict) -> None:
        d = i % len(self.texts)
        with self.lock:
            self.texts[d] += " " + self.rng.choice(WORDS)
            text = self.texts[d]
        status, raw = _call(self.url + "wwt/stream", "POST", {"before": text, "model": self.model, "n": 3,
                                                              "max_new_tokens": 6, "client": f"doc-{d}"}, headers)
        last = [json.loads(data) for name, data in _events(raw) if name in ("done", "error")]
        if status != 200 or not last:
            return self.record("keystroke", "failed", f"HTTP {status}", len(last))
        event = last[-1]
        if event["type"] == "done":
            return self.record("keystroke", "answered", "", len(last))
        kind = event.get("kind", "error")
        self.record("keystroke", "refused" if kind in ("busy", "limit") else "failed", kind, len(last))

    def _gradio(self, kind: str, data: list, headers: dict) -> None:
        status, raw = _call(f"{self.url}gradio_api/call/{kind}", "POST", {"data": data}, headers)
        if status != 200:
            body = raw.decode(errors="replace")
            return self.record(kind, "refused" if status == 503 and "busy" in body else "failed", f"HTTP {status}", 1)
        event_id = json.loads(raw)["event_id"]
        status, raw = _call(f"{self.url}gradio_api/call/{kind}/{event_id}", headers=headers)
        final = [(name, data) for name, data in _events(raw) if name in ("complete", "error")]
        if not final:
            return self.record(kind, "failed", "no final event", 0)
        name, data = final[-1]
        if name == "complete":
            return self.record(kind, "answered", "", len(final))
        message = json.loads(data).get("error") if data.startswith("{") else data
        reason = "busy" if message and str(message).startswith("busy") else str(message)[:60]
        self.record(kind, "refused" if reason == "busy" else "failed", reason, len(final))

    def compare(self, i: int, headers: dict) -> None:
        self._gradio("compare", [" ".join(self.rng.sample(WORDS, 5)), f"{self.model},{self.model}", 6, 1], headers)

    def classify(self, i: int, headers: dict) -> None:
        self._gradio("classify", [" ".join(self.rng.sample(WORDS, 8)), "weather, boats, bread", self.model],
                     headers)

    def share(self, i: int, headers: dict) -> None:
        text = f"Shared {i}: " + " ".join(self.rng.sample(WORDS, 10))
        status, raw = _call(self.url + "wwt/doc", "POST", {"text": text}, headers)
        body = json.loads(raw) if raw.startswith(b"{") else {}
        if status == 200:
            with self.lock:
                self.shared[body["id"]] = text
            return self.record("share", "answered", "", 1)
        self.record("share", "refused" if status in (429, 507) else "failed", body.get("kind", f"HTTP {status}"), 1)


def _reads_back(url: str, doc: str, text: str) -> bool:
    status, raw = _call(f"{url}wwt/doc/{doc}")
    return status == 200 and json.loads(raw).get("text") == text


def soak(minutes: float, rate: float, documents: int, users: int, kill_at: float, restart_at: float,
         model_dir: str | None, seed: int) -> dict:
    from model.network.tiny import make_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="wwt-soak-"))
    model_dir = model_dir or str(make_tiny_model(folder / "tiny", "gpt2", seed=seed))
    spec = f"soak={Path(model_dir).resolve()}"
    env = {"WWT_HEARTBEAT_S": "1", "WWT_HEARTBEAT_TTL_S": "3", "WWT_VISIBILITY_TIMEOUT": "25",
           "WWT_RESTORE_INTERVAL": "2"}
    redis_server = RedisServer(folder / "redis", appendonly=True).start()
    workers = [WorkerProcess(spec, redis_server.url, folder, concurrency=4, env=env, name=f"soak{i}",
                             threads=1).start() for i in range(2)]
    client = redis_server.client()
    for w in workers:
        w.wait_announced(client, timeout=300)
    client.close()
    proc, url, name = start_server(spec, ("--backend", "celery", "--redis-url", redis_server.url),
                                   env=env, folder=folder)
    traffic = Traffic(url, name, documents, users, seed)
    events: list[str] = []
    try:
        for i in range(10):  # warm-up, not counted
            traffic.keystroke(i, {"X-Forwarded-For": "192.0.2.1"})
        traffic.results.clear()
        rss = {"app_start_mb": rss_mb(proc.pid), "worker_start_mb": rss_mb(workers[1].pid)}
        kinds, weights = zip(*MIX)
        pick = random.Random(seed + 1)
        total = int(minutes * 60 * rate)
        started = time.monotonic()
        killed = restarted = False
        with ThreadPoolExecutor(max_workers=64) as pool:
            for i in range(total):
                due = started + i / rate
                time.sleep(max(0.0, due - time.monotonic()))  # open loop: a fixed arrival rate
                done = i / max(1, total)
                if not killed and done >= kill_at:
                    node = workers[0].node()
                    workers[0].kill()
                    killed = True
                    events.append(f"{time.monotonic() - started:.0f} s: SIGKILL to worker {node}")
                if not restarted and done >= restart_at:
                    redis_server.stop()
                    time.sleep(2)
                    redis_server.start()
                    restarted = True
                    events.append(f"{time.monotonic() - started:.0f} s: Redis stopped and started again")
                pool.submit(traffic.one, pick.choices(kinds, weights)[0], i)
        elapsed = time.monotonic() - started
        rss.update(app_end_mb=rss_mb(proc.pid), worker_end_mb=rss_mb(workers[1].pid))
        lost = [doc for doc, text in traffic.shared.items() if not _reads_back(url, doc, text)]
    finally:
        stop_process(proc, 15)
        for w in workers:
            w.stop()
        redis_server.stop()
    results = traffic.results
    by_outcome = Counter(outcome for _, outcome, _, _ in results)
    return {"minutes": elapsed / 60, "rate": rate, "sent": len(results), "events": events,
            "answered": by_outcome["answered"], "refused": by_outcome["refused"], "failed": by_outcome["failed"],
            "by_kind": {k: dict(Counter(o for kind, o, _, _ in results if kind == k)) for k in kinds},
            "reasons": dict(Counter(f"{o}: {r}" for _, o, r, _ in results if o != "answered")),
            "no_reply": sum(1 for *_, n in results if n == 0), "several_replies": sum(1 for *_, n in results if n > 1),
            "shared": len(traffic.shared), "shared_lost": len(lost), **rss}


def format_report(r: dict) -> str:
    lines = [f"{r['sent']} requests in {r['minutes']:.1f} min at {r['rate']:g}/s: {r['answered']} answered, "
             f"{r['refused']} refused, {r['failed']} failed; {r['no_reply']} without a reply, "
             f"{r['several_replies']} with more than one",
             *(f"  {e}" for e in r["events"]),
             *(f"  {kind}: {counts}" for kind, counts in r["by_kind"].items()),
             *(f"  {reason}: {n}" for reason, n in sorted(r["reasons"].items())),
             f"shared documents: {r['shared']}, lost: {r['shared_lost']}",
             f"RSS app {r['app_start_mb']:.0f} -> {r['app_end_mb']:.0f} MB, surviving worker "
             f"{r['worker_start_mb']:.0f} -> {r['worker_end_mb']:.0f} MB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wwt soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second, open loop")
    p.add_argument("--documents", type=int, default=40)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--kill-at", type=float, default=0.3, help="share of the run when a worker gets SIGKILL")
    p.add_argument("--restart-at", type=float, default=0.6, help="share of the run when Redis restarts")
    p.add_argument("--model-dir", default=None, help="a checkpoint folder; default: a tiny random one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = soak(args.minutes, args.rate, args.documents, args.users, args.kill_at, args.restart_at,
                  args.model_dir, args.seed)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["no_reply"] == 0 and result["several_replies"] == 0 and result["shared_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
