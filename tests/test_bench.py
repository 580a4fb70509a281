"""`wwt bench` runs, on a tiny checkpoint, whatever the pace bound is set to (its engines let every
request in: it measures speed, not refusals)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_batching_section_runs_under_any_pace_bound(tiny_gpt2):
    # A bound of a microsecond would refuse the section's concurrent callers if the bench kept it.
    env = {**os.environ, "WWT_MAX_WAIT_S": "0.000001", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--quick", "--only", "batching",
                          "--checkpoint", str(tiny_gpt2)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Busy" not in run.stderr
    assert "4. 8 callers x 3 suggestions: batched" in run.stdout, run.stdout


def test_a_short_soak_of_the_distributed_stack_answers_every_request_once():
    """`wwt soak` for a quarter of a minute: real Redis with an append-only file, two workers (one
    SIGKILLed), the app, Redis restarted; it exits 0 only when every request got exactly one reply
    and every shared document reads back."""
    import json
    import shutil

    import pytest

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "app.cli", "soak", "--minutes", "0.25", "--rate", "4",
                          "--kill-at", "0.3", "--restart-at", "0.6", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    report = json.loads(run.stdout)
    assert report["sent"] == 60 and report["no_reply"] == 0 and report["several_replies"] == 0
    assert report["answered"] > 0 and report["shared_lost"] == 0
    assert len(report["events"]) == 2 and "SIGKILL" in report["events"][0] and "Redis" in report["events"][1]


def test_the_writers_section_measures_what_fits_reuse_and_both_policies(tiny_gpt2):
    """The many-writers section on the tiny model (documents of 30, 60 and 120 tokens, 60 typed in
    turn, 1,024 positions of cache): blocks hold more documents than whole-context slots would,
    and past capacity next-use keeps more documents warm than least recently used."""
    from app.bench.speed import document_text
    from app.bench.writers import format_report, many_writers
    from model import Engine
    from model.serving.engine_config import EngineConfig

    engines = []

    def make_engine(**changes):
        config = EngineConfig(kv_tokens=1024, rows=8, max_wait_s=None).with_(**changes)
        engines.append(Engine.from_pretrained(str(tiny_gpt2), device="cpu", config=config))
        return engines[-1]

    tok = make_engine().tokenizer
    result = many_writers(make_engine, lambda n, salt: document_text(tok, n, salt), quick=True,
                          lengths=(30, 60, 120), turn_length=60)
    for engine in engines:
        engine.close()
    fits = {f["tokens"]: f for f in result["fits"]}
    assert fits[30]["held"] > fits[60]["held"] > fits[120]["held"] >= 1
    assert fits[60]["ratio"] > 2  # documents of a quarter of the context: far more than one per slot
    turns = {t["multiple"]: t for t in result["turns"]}
    assert turns[1]["reused_document"] >= 0.9 and turns[4]["reused_document"] < turns[1]["reused_document"]
    policy = {(p["policy"], p["trace"]): p["reused_document"] for p in result["policies"]}
    assert policy[("next-use", "round-robin")] > policy[("lru", "round-robin")]
    assert policy[("next-use", "bursty")] >= 0.5
    report = format_report(result)
    assert "per GB of KV cache" in report and "lru" in report and "interleaved" in report
