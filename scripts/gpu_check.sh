#!/usr/bin/env bash
# One-shot GPU check: the CUDA-marked tests, then `wwt bench --sizes --device cuda` on a subset of
# sizes and precisions, all within 8 minutes, for the first time a GPU machine is at hand.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu-check-out)
#
# It needs no network and no install: it runs this checkout with the machine's Python
# (PYTHONPATH=repository root; $PYTHON picks another interpreter), which must have torch,
# safetensors, tokenizers, huggingface_hub, transformers and pytest. Neither the bench nor the
# selected tests import gradio, celery, redis, mcp or openai, and pytest-timeout may be absent
# (each step has a `timeout` of its own instead). Test modules are picked by what they import:
# every tests/test_*.py that uses the `cuda` marker and whose module-level imports (and
# conftest.py's) import here.
#
# Everything goes to OUT_DIR: gpu_check.log (the whole run), env.txt, selection.txt, pytest.log and
# pytest.xml, sizes-<size>-<precision>.json (one row each; every step's stderr beside its output as
# .stderr), sizes.json and sizes.md (the rows together), summary.txt.
#
# Exit status: 0 the CUDA tests passed and every size was measured; 1 a CUDA test failed (or none
# ran); 2 no CUDA device (GPU_CHECK_DRY=1 forces this): the selection and collection were
# checked and the bench ran once on a tiny model on the CPU, nothing was measured on a GPU;
# 3 the tests passed but a size failed, timed out or did not fit in the time; 4 the Python here
# cannot run the check at all.

set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu-check-out}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
cd "$REPO" || exit 4

START=$SECONDS
BUDGET_S="${GPU_CHECK_SECONDS:-430}"  # steps stop here; the summary follows, well inside 8 minutes
CHECKPOINTS="$(mktemp -d -t gpu-check-checkpoints.XXXXXX)"  # random weights: not in OUT_DIR
trap 'rm -rf "$CHECKPOINTS"' EXIT

log() { echo "[gpu-check $((SECONDS - START))s] $*" | tee -a "$LOG"; }

# limit SECONDS: the seconds a step wanting SECONDS may take: as many, but never past the budget.
limit() {
    local left=$((BUDGET_S - (SECONDS - START)))
    echo $(($1 < left ? $1 : left))
}

# step SECONDS OUTPUT_FILE COMMAND...: run COMMAND under `timeout` for at most `limit SECONDS`; its
# stdout goes to OUTPUT_FILE, its stderr to OUTPUT_FILE.stderr, both to the log. Status 125 when there
# was no time left to start it.
step() {
    local seconds output=$2
    seconds=$(limit "$1")
    shift 2
    if ((seconds < 15)); then
        log "skipped (no time left): $*"
        return 125
    fi
    log "run (at most ${seconds}s): $*"
    timeout --kill-after=5 "$seconds" "$@" >"$output" 2>"$output.stderr"
    local status=$?
    cat "$output" "$output.stderr" >>"$LOG"
    ((status == 124 || status == 137)) && log "timed out after ${seconds}s"
    log "status $status"
    return $status
}

# -- 1. the Python here ---------------------------------------------------------------------------
step 60 "$OUT_DIR/env.txt" "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda build", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("transformers", "safetensors", "tokenizers", "huggingface_hub", "pytest"):
    module = __import__(name)
    print(name, getattr(module, "__version__", "?"))
import app.cli, app.bench.sizes, app.bench.sizes_measure  # the bench path: nothing the image lacks
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("gradio", "celery", "redis", "mcp", "openai"))
assert not heavy, f"the bench path imported {heavy}"
print("bench imports: no gradio, celery, redis, mcp or openai")
EOF
env_status=$?
if ((env_status != 0)); then
    log "this Python cannot run the check (env.txt says why)"
    exit 4
fi
CUDA=no
grep -q "^cuda available True" "$OUT_DIR/env.txt" && CUDA=yes
[[ "${GPU_CHECK_DRY:-0}" == 1 ]] && CUDA=no

# -- 2. which test modules can run here ---------------------------------------------------------------
step 60 "$OUT_DIR/selection.txt" "$PY" - <<'EOF'
"""Each tests/test_*.py that uses the cuda marker, kept if its module-level imports (and conftest.py's)
import in this Python; "selected PATH" or "left out PATH: MODULE: ERROR" per module."""
import ast, importlib, sys
from pathlib import Path

sys.path[:0] = ["tests", "."]


def imported(path):
    names, body = [], list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, (ast.If, ast.Try)):
            body += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
    return names


def first_failure(names):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or an import that fails for another reason
            return f"{name}: {type(e).__name__}: {e}"
    return None


common = first_failure(imported(Path("tests/conftest.py")))
for path in sorted(Path("tests").glob("test_*.py")):
    if "mark.cuda" not in path.read_text():
        continue
    failure = common or first_failure(imported(path))
    print(f"left out {path}: {failure}" if failure else f"selected {path}")
EOF
SELECTED=()
while read -r word path; do
    [[ "$word" == selected ]] && SELECTED+=("$path")
done <"$OUT_DIR/selection.txt"
log "CUDA test modules selected: ${SELECTED[*]:-none}"
PYTEST=("$PY" -m pytest -m cuda -p no:cacheprovider -o addopts= -q -rs)

if [[ "$CUDA" == no ]]; then
    # -- no device: prove the plumbing (collection, the bench's command line) and stop ------------------
    status=2
    if ((${#SELECTED[@]} == 0)); then
        log "no CUDA test module could be selected"
        status=4
    elif ! step 90 "$OUT_DIR/collect.txt" "${PYTEST[@]}" --collect-only "${SELECTED[@]}"; then
        log "collecting the CUDA tests failed (collect.txt)"
        status=4
    fi
    step 120 "$OUT_DIR/sizes-plumbing.json" "$PY" -m app.bench.sizes --shape tiny:2,64,4,1000 --dtype float32 \
        --device cpu --quick --json --cache-dir "$CHECKPOINTS" || { log "the sizes bench failed on the CPU"; status=4; }
    collected="$(grep -E "tests? collected" "$OUT_DIR/collect.txt" 2>/dev/null | tail -1)"
    {
        echo "no CUDA device: nothing was measured on a GPU (exit status $status)"
        echo "selected: ${SELECTED[*]:-none}"
        echo "collected with -m cuda: ${collected:-nothing}"
    } | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"
    exit $status
fi

# -- 3. the CUDA tests ------------------------------------------------------------------------------
tests_status=1
if ((${#SELECTED[@]} > 0)); then
    step 150 "$OUT_DIR/pytest.log" "${PYTEST[@]}" --junitxml="$OUT_DIR/pytest.xml" "${SELECTED[@]}"
    tests_status=$?
    ((tests_status == 5)) && log "pytest collected no CUDA test"
fi

# -- 4. the sizes, one (size, precision) a step, so a slow one costs only its own row -----------------
bench_status=0
checkpoint() {  # write a size's random checkpoint once; the measuring steps reuse it (--cache-dir)
    step "$2" "$OUT_DIR/checkpoint-$1.txt" "$PY" -c 'import sys
from app.bench.sizes_checkpoint import random_checkpoint, real_shape
print(random_checkpoint(sys.argv[1], sys.argv[2], real_shape(sys.argv[2])))' "$CHECKPOINTS" "$1" || bench_status=3
}
measure() {  # SIZE PRECISION SECONDS: one row; the bench gives up on its process 10 s before the step ends
    local seconds
    seconds=$(limit "$3")
    step "$seconds" "$OUT_DIR/sizes-$1-$2.json" "$PY" -m app.bench.sizes --sizes "$1" --dtype "$2" \
        --device cuda --quick --json --cache-dir "$CHECKPOINTS" --run-timeout $((seconds - 10)) || bench_status=3
}
checkpoint gpt2 40
measure gpt2 float16 70
measure gpt2 int8 70
checkpoint gpt2-xl 100
measure gpt2-xl float16 120
measure gpt2-xl int8 140
measure gpt2 int4 70  # last: the row to lose if time runs short

# -- 5. summary -------------------------------------------------------------------------------------
timeout 30 "$PY" - "$OUT_DIR" <<'EOF' >>"$LOG" 2>&1
"""sizes-*.json (one report each) -> sizes.json and sizes.md; a step that left no report is a failed row."""
import json, sys
from pathlib import Path
from app.bench.sizes import format_report

out = Path(sys.argv[1])
reports, rows = [], []
for size, precision in (("gpt2", "float16"), ("gpt2", "int8"), ("gpt2", "int4"),
                        ("gpt2-xl", "float16"), ("gpt2-xl", "int8")):
    path = out / f"sizes-{size}-{precision}.json"
    try:
        report = json.loads(path.read_text())
        reports.append(report)
        rows += report["rows"]
    except (OSError, ValueError):
        rows.append({"size": size, "precision": precision, "status": "failed",
                     "error": "no report: the step timed out, did not fit in the time, or crashed (gpu_check.log)"})
machine = reports[0]["machine"] if reports else {"date": "?", "cpu": "?", "cpu_flags": {}, "device": "cuda"}
together = {"machine": machine, "quick": True, "rows": rows}
(out / "sizes.json").write_text(json.dumps(together, indent=2))
(out / "sizes.md").write_text(format_report(together) + "\n")
EOF
{
    echo "CUDA tests: $([[ $tests_status == 0 ]] && echo passed || echo "FAILED (status $tests_status)") - $(tail -1 "$OUT_DIR/pytest.log" 2>/dev/null)"
    echo "sizes: $([[ $bench_status == 0 ]] && echo "every row measured" || echo "SOME ROWS FAILED OR DID NOT FIT")"
    cat "$OUT_DIR/sizes.md" 2>/dev/null
    echo "took $((SECONDS - START)) s; everything is in $OUT_DIR"
} | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"
((tests_status != 0)) && exit 1
((bench_status != 0)) && exit 3
exit 0
