"""One (size, precision) of the sizes report, measured in a process of its own.

`python -m app.bench.sizes_measure --folder DIR --precision P [--device cpu|cuda] [--quick]`
prints one JSON line on stdout. The report (sizes.py) starts one such process per size and
precision, so the memory figures of one load never include another's and a big model's memory is
handed back to the system before the next starts; a process that dies (the out-of-memory killer)
takes only its own row with it.

What it measures, in this order:
1. the read bandwidth of this machine, right before loading (`read_bandwidth`);
2. the load: seconds in `Engine.from_pretrained`, and the memory it leaves behind once every page
   of the KV cache has been touched (`memory_now`: anonymous memory on CPU, so file-backed pages of
   the checkpoint that the kernel may keep or drop do not count; allocated memory on CUDA);
3. a decode step at batch 1 after a 128-token prompt, a keystroke at 900 tokens and its first
   partial suggestion, each also as a multiple of the memory bound: the weight bytes a step must
   read (`step_read_bytes`) over the measured bandwidth.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from model.serving.threads import in_fresh_thread

from .speed import completion_request, document_text

THREADS = 2  # on CPU, as `wwt bench`: the figures compare across machines of different core counts
MIN_SLOTS = 4  # 3 suggestions of a keystroke, plus the slot that keeps the document's prefix
DECODE_PROMPT_TOKENS = 128
KEYSTROKE_TOKENS = 900
TYPED = " the sea"  # two words typed after the suggestion shown for the document
STATS_WORDS = ("kernel", "dtype", "precision")


# -- the memory bound ---------------------------------------------------------------------------

def read_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes a second this device reads: `x.sum()` over 1 GiB of float32, median of `repeats` timings
    after one discarded. On CUDA each timing runs 10 sums between synchronizations, so the launch
    and the synchronization do not count against a 0.3 ms read."""
    x = torch.ones(2**28, dtype=torch.float32, device=device)  # ones, not empty: every page is resident
    inner = 10 if device.type == "cuda" else 1
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            x.sum()
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
    nbytes = x.numel() * x.element_size()
    del x
    return nbytes / statistics.median(times[1:])


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tensor reachable twice counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or (t.device, t.data_ptr()) in seen:
            continue
        seen.add((t.device, t.data_ptr()))
        total += t.numel() * t.element_size()
    return total


def step_read_bytes(model) -> int:
    """The weight bytes one decode step must read: what the bound divides by the read bandwidth.

    The rule: every tensor of `quantize.weight_bytes(model)` (parameters and buffers, each counted
    once, so a tied embedding / LM head matrix already counts once, and fbgemm's int8 copies) and
    the oneDNN-packed float32 matrices on CPU (they replace the plain ones), less
    - the position embedding: a step reads one row of it;
    - the token embedding where the LM head does not multiply with its storage: a step looks up one
      row of it. That is the whole embedding when the head has a matrix of its own (an untied
      checkpoint), and for a tied matrix kept in two layouts (int4 on CPU: 4-bit codes beside the
      kernel's layout; int8 with the dynamic kernel: int8 codes beside fbgemm's copy) the lookup one.
    """
    from model.serving.cpu_kernels import packed_bytes
    from model.serving.quantize import QuantMatrix, weight_bytes

    body = model.transformer
    read = weight_bytes(model) + packed_bytes(model) - tensor_bytes(list(body.wpe.parameters()) + list(body.wpe.buffers()))
    head = getattr(model, "lm_head", None)
    if head is not None and weight_bytes(head) + packed_bytes(head) > 0:  # untied: the head has its own matrix
        return read - weight_bytes(body.wte)
    for module in body.wte.modules():
        if not isinstance(module, QuantMatrix):
            continue
        if getattr(module, "dynamic", None) is not None and module.q is not None:
            read -= tensor_bytes([module.q])
        elif isinstance(getattr(module, "packed", None), torch.Tensor) and \
                isinstance(getattr(module, "int4pack", None), torch.Tensor):
            read -= tensor_bytes([module.packed])
    return read


def kv_read_bytes(engine, tokens: int) -> int:
    """KV-cache bytes one row's decode step reads at `tokens` of context (keys and values, every layer)."""
    cache = engine.cache
    return cache.bytes_per_token() * tokens


# -- memory at load ---------------------------------------------------------------------------

def memory_now(device: torch.device) -> tuple[int, str]:
    """(bytes, what was read): on CUDA the peak allocated since the last reset; on CPU this process's
    anonymous resident memory (RssAnon), else its whole resident set, else its peak resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        status = []
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    for name in ("RssAnon", "VmRSS"):
        if name in fields:
            return int(fields[name].split()[0]) * 1024, name
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak RSS"


def settle_memory(device: torch.device) -> None:
    """Hand freed memory back (Python's garbage, glibc's free heap pages, CUDA's cached blocks), so a
    baseline taken now does not hide what a load reuses."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def touch_cache(engine) -> None:
    """Write every page of every buffer of the KV cache, on the model thread: a buffer of zeros the
    allocator got from the system is not resident until written."""
    def fill():
        for buffer in engine.cache.buffers():
            buffer.fill_(0)
        _sync(engine.device)

    engine.run_on_model_thread(fill)


# -- the timed runs -----------------------------------------------------------------------------

def decode_step_ms(engine, repeats: int, new_tokens: int) -> float:
    """Milliseconds a decode step takes at batch 1 after a 128-token prompt: (T(n) - T(1)) / (n - 1)
    for greedy runs of n and 1 new tokens on a prompt already in the cache, median of `repeats`."""
    steps = []
    for r in range(repeats):
        text = document_text(engine.tokenizer, DECODE_PROMPT_TOKENS, 100 + r)
        engine.complete(completion_request(text, 1, 1, True, 0))  # the prompt is prefilled once
        one = _timed(engine, completion_request(text + " x", 1, 1, True, 0))
        many = _timed(engine, completion_request(text + " x", 1, new_tokens, True, 0))
        steps.append((many - one) / (new_tokens - 1))
    return statistics.median(steps) * 1000


def keystroke(engine, repeats: int) -> dict:
    """A keystroke as `wwt bench` times it (Bench.keystroke): a 900-token document already suggested
    for, two words typed, 3 suggestions x 8 tokens. Here the request is streamed, as the editor
    receives it: `keystroke_ms` is submit to the final answer, `first_partial_ms` submit to the
    first update that shows some text (an update with only empty suggestions shows nothing)."""
    totals, firsts, reused = [], [], []
    for r in range(repeats):
        doc = document_text(engine.tokenizer, KEYSTROKE_TOKENS, 1000 * KEYSTROKE_TOKENS + r)
        engine.complete(completion_request(doc, 3, 8, False, r))  # the suggestion shown before typing on
        t0 = time.perf_counter()
        first = None
        for update in engine.stream(engine.submit(completion_request(doc + TYPED, 3, 8, False, r))):
            if first is None and any(s.text for s in update.suggestions):
                first = time.perf_counter() - t0
            if update.completion is not None:
                totals.append(time.perf_counter() - t0)
                reused.append(update.completion.timings.tokens_reused)
        firsts.append(first if first is not None else totals[-1])
    return {"keystroke_ms": statistics.median(totals) * 1000, "first_partial_ms": statistics.median(firsts) * 1000,
            "keystroke_tokens_reused": statistics.median(reused)}


def _timed(engine, request) -> float:
    t0 = time.perf_counter()
    engine.complete(request)
    _sync(engine.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one row ------------------------------------------------------------------------------------

def engine_choices(engine) -> dict:
    """The keys of engine.stats() about kernels, dtypes and precision, whatever the engine reports."""
    return {k: v for k, v in engine.stats().items() if any(word in k for word in STATS_WORDS)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .machine import cpu_model

    return cpu_model()


def measure(folder: Path, precision: str, device: torch.device, quick: bool, crash: bool = False) -> dict:
    from model.serving.engine import Engine

    from .speed import bench_config

    repeats = 2 if quick else 4
    bandwidth = (in_fresh_thread(read_bandwidth, device, 4 if quick else 8) if device.type == "cpu"
                 else read_bandwidth(device, 20))
    config = bench_config()
    if config.slots is not None and config.slots < MIN_SLOTS:
        config = config.with_(slots=MIN_SLOTS)
    settle_memory(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else memory_now(device)[0]
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(f"{folder}@{precision}", device=device, config=config)
    load_s = time.perf_counter() - t0
    try:
        touch_cache(engine)
        after, source = memory_now(device)
        if crash:  # what the out-of-memory killer does to a process: no answer, no cleanup
            os.kill(os.getpid(), signal.SIGKILL)
        weights_and_cache = engine.memory_bytes()
        read = step_read_bytes(engine.model)
        bound_ms = read / bandwidth * 1000
        engine.complete(completion_request("Warm up", 1, 4, True, 0))  # one-off costs of a first request
        step_ms = decode_step_ms(engine, repeats, 16 if quick else 32)
        keys = keystroke(engine, repeats)
        memory = after - before
        return {
            "status": "ok", "precision": engine.precision, "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "load_s": load_s,
            "memory_at_load_mb": memory / 2**20, "memory_source": source,
            "weights_and_cache_mb": weights_and_cache / 2**20, "memory_ratio": memory / weights_and_cache,
            "weights_mb": engine.weight_bytes() / 2**20, "kv_cache_mb": engine.cache.nbytes() / 2**20,
            "rows": engine.rows, "kv_tokens": engine.cache.tokens, "step_read_mb": read / 2**20, "read_bandwidth_gb_s": bandwidth / 1e9,
            "bound_ms": bound_ms, "decode_step_ms": step_ms, "decode_x_bound": step_ms / bound_ms,
            "kv_read_decode_mb": kv_read_bytes(engine, DECODE_PROMPT_TOKENS) / 2**20,
            **keys, "keystroke_x_bound": keys["keystroke_ms"] / bound_ms,
            "first_partial_x_bound": keys["first_partial_ms"] / bound_ms,
            "engine": engine_choices(engine),
        }
    finally:
        engine.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench.sizes_measure",
                                description="measure one checkpoint at one precision; one JSON line on stdout")
    p.add_argument("--folder", required=True, help="a GPT-2 checkpoint folder")
    p.add_argument("--precision", required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--crash", action="store_true", help=argparse.SUPPRESS)  # tests: die as if out of memory
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(THREADS)
    try:
        result = measure(Path(args.folder), args.precision, device, args.quick, args.crash)
    except Exception as e:  # out of memory, a precision the checkpoint cannot take: a row that says so
        print(json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
