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
