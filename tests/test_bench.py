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
