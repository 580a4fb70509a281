"""`wwt bench --sizes`: every GPT-2 size at several precisions, one process each, in one table.

For each size (distilgpt2, gpt2, gpt2-medium, gpt2-large, gpt2-xl; random weights at the real
shapes, or `--checkpoint DIR`) and each precision (float32, int8, int4 unless `--dtype` names
others) a process of its own (sizes_measure.py) loads the engine and measures:

- load s: seconds in `Engine.from_pretrained`, from the checkpoint on disk to a ready engine;
- memory at load: what the load left in memory once every page of the KV cache was written,
  beside what the engine says it holds (`engine.memory_bytes()`: weights with any packed copies,
  plus the KV cache) and their ratio. On CPU the growth of the process's anonymous memory
  (RssAnon), so pages of the checkpoint file that the kernel caches are not counted; on CUDA the
  growth of `torch.cuda.max_memory_allocated`, so it includes what loading needed for a moment;
- decode step: ms per token at batch 1 after a 128-token prompt;
- keystroke: ms for 3 suggestions x 8 tokens after two words typed into a 900-token document
  already suggested for, streamed as the editor receives it; first partial: ms until the first
  streamed update with text;
- bound: the weight bytes a step must read (sizes_measure.step_read_bytes) over the read
  bandwidth measured in the same process right before loading (`x.sum()` over 1 GiB); each time
  is also given as a multiple of it. The KV cache's size stands beside it: at long documents a
  step also reads the cache, which the bound leaves out.

A process per row keeps one load's memory out of the next's figures, and a row whose process
fails, runs out of memory or passes `--run-timeout` is reported as such while the run goes on
(the exit status is then 1). Random checkpoints are written once per size into `--cache-dir`
(kept for the next run) or a temporary folder (deleted as soon as that size is measured:
gpt2-xl takes 6.2 GB of disk). This module imports only the standard library at load, so
`wwt bench --help` stays fast; the measuring processes import torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .machine import cpu_flags, cpu_model
from .sizes_checkpoint import SIZES, random_checkpoint, real_shape

DEFAULT_PRECISIONS = ("float32", "int8", "int4")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # so the measuring processes import this checkout
COLUMNS = ("size", "precision", "load s", "memory at load MB vs weights+cache MB (ratio)",
           "decode step ms (× bound)", "keystroke ms (× bound)", "first partial ms (× bound)", "bound ms",
           "KV cache MB")


def add_sizes_arguments(p: argparse.ArgumentParser, sizes_default: Optional[str] = None) -> None:
    """The options of the sizes report that `wwt bench` does not have already (--quick, --json,
    --dtype, --device and --checkpoint are shared)."""
    p.add_argument("--sizes", nargs="?", const="all", default=sizes_default,
                   help=f"measure GPT-2 sizes one process each: all ({', '.join(SIZES)}) or a comma-separated "
                        "subset, at --dtype (default float32,int8,int4), instead of the usual sections")
    p.add_argument("--cache-dir", default=None,
                   help="keep the random checkpoints of --sizes here and reuse them (default: a temporary "
                        "folder, deleted after each size)")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="give up on one (size, precision) after this many seconds and go on")
    # tests: a tiny shape instead of the real ones ("NAME:LAYERS,WIDTH,HEADS,VOCAB"), and a measuring
    # process that dies as the out-of-memory killer would leave it (its precision)
    p.add_argument("--shape", action="append", default=None, help=argparse.SUPPRESS)
    p.add_argument("--simulate-crash", default=None, help=argparse.SUPPRESS)


class UsageError(ValueError):
    """An option that cannot be used: said in one line, exit status 2."""


def chosen_sizes(args) -> list[tuple[str, Optional[dict]]]:
    """(name, shape) of each size to measure; shape None for a checkpoint of the user's own."""
    if getattr(args, "checkpoint", None):
        folder = Path(args.checkpoint)
        if not (folder / "config.json").is_file():
            raise UsageError(f"--checkpoint {folder}: no config.json there")
        return [(folder.resolve().name, None)]
    if getattr(args, "shape", None):
        return [parse_shape(s) for s in args.shape]
    names = SIZES if args.sizes in (None, "", "all") else [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise UsageError(f"unknown size {', '.join(unknown)}: choose all or some of {', '.join(SIZES)}")
    return [(name, real_shape(name)) for name in names]


def parse_shape(text: str) -> tuple[str, dict]:
    """"tiny:2,64,4,1000" -> ("tiny", n_layer 2, n_embd 64, n_head 4, vocab 1000, n_positions 1024)."""
    name, _, dims = text.partition(":")
    try:
        layers, width, heads, vocab, *rest = (int(d) for d in dims.split(","))
    except ValueError:
        raise UsageError(f"--shape {text!r}: expected NAME:LAYERS,WIDTH,HEADS,VOCAB[,POSITIONS]") from None
    return name, dict(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab,
                      n_positions=rest[0] if rest else 1024)


def chosen_precisions(text: Optional[str]) -> list[str]:
    from model.network.known import PRECISION_ALIASES, PRECISIONS

    names = [n.strip().lower() for n in (text or ",".join(DEFAULT_PRECISIONS)).split(",") if n.strip()]
    names = [PRECISION_ALIASES.get(n, n) for n in names]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise UsageError(f"unknown precision {', '.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    return names


# -- one row, one process -------------------------------------------------------------------------

def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def last_json_line(stdout: str) -> Optional[dict]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def describe_exit(returncode: int, stderr: str) -> str:
    """Why a measuring process ended without a result, in one line."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (out of memory: the kernel's OOM killer, or a memory limit)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no output")
    return f"exit status {returncode}: {last[:300]}"


def measure_in_process(folder: Path, size: str, precision: str, args) -> dict:
    """Run sizes_measure for one (size, precision); its JSON row, or a failed row saying why."""
    cmd = [sys.executable, "-m", "app.bench.sizes_measure", "--folder", str(Path(folder).resolve()),
           "--precision", precision, "--device", args.device or "cpu"]
    if args.quick:
        cmd.append("--quick")
    if getattr(args, "simulate_crash", None) == precision:
        cmd.append("--crash")
    row = {"size": size, "precision": precision}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=args.run_timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "error": f"timed out after {args.run_timeout:g} s"}
    result = last_json_line(proc.stdout)
    if result is None or (proc.returncode != 0 and result.get("status") == "ok"):
        result = {"status": "failed", "error": describe_exit(proc.returncode, proc.stderr)}
    return {**row, **result, "process_s": time.perf_counter() - t0}


def progress(message: str) -> None:
    print(f"[sizes] {message}", file=sys.stderr, flush=True)


# -- the run ----------------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "device": device, "python": platform.python_version()}


def measure_sizes(args) -> dict:
    sizes, precisions = chosen_sizes(args), chosen_precisions(args.dtype)
    report = {"machine": machine_info(args.device or "cpu"), "quick": bool(args.quick), "rows": []}
    with tempfile.TemporaryDirectory(prefix="wwt-sizes-") as tmp:
        parent = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        for name, shape in sizes:
            folder = Path(args.checkpoint) if shape is None else None
            if folder is None:
                progress(f"{name}: random checkpoint ({shape['n_layer']} layers, {shape['n_embd']} wide) in {parent}")
                try:
                    folder = random_checkpoint(parent, name, shape)
                except Exception as e:  # a full disk, say: this size's rows say so, the next size runs
                    error = f"could not write its random checkpoint: {type(e).__name__}: {e}"
                    report["rows"] += [{"size": name, "precision": p, "status": "failed", "error": error}
                                       for p in precisions]
                    continue
            for precision in precisions:
                progress(f"{name} {precision}: measuring in a process of its own")
                row = measure_in_process(folder, name, precision, args)
                progress(f"{name} {precision}: {row['status']}" + (f" ({row['error']})" if "error" in row else ""))
                report["rows"].append(row)
            if shape is not None and not args.cache_dir:
                shutil.rmtree(folder, ignore_errors=True)  # gpt2-xl's 6.2 GB go before the next size
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    if ok:
        report["machine"].update(device_name=ok[0]["device_name"], threads=ok[0]["threads"])
    return report


# -- the table --------------------------------------------------------------------------------------

def _number(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _times(ms: float, times_bound: float) -> str:
    return f"{_number(ms)} ({_number(times_bound)}x)"


def table_row(r: dict) -> str:
    if r["status"] != "ok":
        cells = [r["size"], r["precision"], f"failed: {r.get('error', 'no result')}"] + [""] * (len(COLUMNS) - 3)
    else:
        cells = [r["size"], r["precision"], f"{r['load_s']:.1f}",
                 f"{r['memory_at_load_mb']:,.0f} vs {r['weights_and_cache_mb']:,.0f} ({r['memory_ratio']:.2f})",
                 _times(r["decode_step_ms"], r["decode_x_bound"]),
                 _times(r["keystroke_ms"], r["keystroke_x_bound"]),
                 _times(r["first_partial_ms"], r["first_partial_x_bound"]),
                 f"{r['bound_ms']:,.2f}", f"{r['kv_cache_mb']:,.0f}"]
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def format_report(report: dict) -> str:
    m = report["machine"]
    flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in m["cpu_flags"].items())
    lines = [f"Sizes, {m['date']}: CPU {m['cpu']} ({flags}); device {m.get('device_name', m['device'])}; "
             f"{m.get('threads', '?')} threads{'; --quick' if report['quick'] else ''}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [table_row(r) for r in report["rows"]]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    if ok:
        source = ok[0]["memory_source"]
        lines += ["", f"memory at load: growth of {source} from before Engine.from_pretrained to after loading and "
                      "writing every page of the KV cache; weights+cache: engine.memory_bytes()",
                  "bound: weight bytes a decode step reads / read bandwidth measured in the same process "
                  "(x.sum() over 1 GiB); × bound: the time over it", ""]
        for r in ok:
            lines.append(f"{r['size']} {r['precision']}: reads {r['step_read_mb']:,.0f} MB a step at "
                         f"{r['read_bandwidth_gb_s']:.1f} GB/s; {r['kv_tokens']} KV positions; engine: "
                         + ", ".join(f"{k} {_plain(v)}" for k, v in r["engine"].items()))
    return "\n".join(lines)


def _plain(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def run_sizes(args) -> int:
    """Measure, then print the table (or with --json the report); exit status 1 if a row failed."""
    try:
        report = measure_sizes(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if all(r["status"] == "ok" for r in report["rows"]) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench.sizes", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--dtype", default=None, help="precisions, comma-separated (default float32,int8,int4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--checkpoint", default=None, help="measure this GPT-2 checkpoint folder instead of random sizes")
    add_sizes_arguments(p, sizes_default="all")
    return p


def main(argv=None) -> int:
    return run_sizes(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
