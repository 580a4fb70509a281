"""`wwt bench --only writers`: many documents typed against one engine, past what its KV cache holds.

1. Documents that fit: documents of 100, 300 and 900 tokens are typed once each (a keystroke: 3
   suggestions x 8 tokens) until the cache evicts; the documents it then holds, per GB of KV cache,
   against a cache of whole-context slots (each document a slot, less the working slots of one
   request's other suggestions) at the same KV dtype.
2. Typed in turn at 1x, 2x and 4x the documents that fit (300 tokens): the share of keystrokes
   that reused their document (prefilled only what was typed since), the share of prompt tokens
   reused, and the keystroke latency (median, p95).
3. The eviction policy against least recently used, on the same engine setup: round-robin typing
   at 2x what fits, and a bursty trace (a few writers typing most keystrokes, many documents
   typed now and then).
4. Placement: the decode step of 1 and 3 suggestions on a 900-token document whose blocks are
   consecutive (read as one view of the pool) against the same document with its blocks
   interleaved with another sequence's (gathered for every step); and 300-token documents that
   fit with blocks of 16 and of 64 positions.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

SUGGESTIONS, NEW_TOKENS = 3, 8
LENGTHS = (100, 300, 900)
TURN_LENGTH = 300


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was really measured."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def keystroke(engine, text: str, seed: int):
    from model.types import CompletionRequest

    request = CompletionRequest(text=text, n=SUGGESTIONS, max_new_tokens=NEW_TOKENS, seed=seed, stop=None)
    t0 = time.perf_counter()
    done = engine.complete(request)
    return done.timings, (time.perf_counter() - t0) * 1000


def documents_that_fit(make_engine: Callable, document: Callable[[int, int], str], tokens: int) -> dict:
    """Type documents of `tokens` tokens once each until the cache has evicted a few; what it holds then.
    `make_engine()` gives a fresh engine."""
    engine = make_engine()
    try:
        stats = engine.stats()
        cache_gb = engine.cache.nbytes() / 2**30
        typed = 0
        while engine.stats()["evictions"] < 3 and typed < 10_000:
            keystroke(engine, document(tokens, 7000 + typed), seed=typed)
            typed += 1
        held = engine.stats()["kv_documents"]
        per_token = engine.cache.bytes_per_token()
        slot_gb = engine.config.n_positions * per_token / 2**30
        slots_per_gb = 1 / slot_gb - (SUGGESTIONS - 1)  # a slot per document, less a request's working slots
        return {"tokens": tokens, "held": held, "typed": typed, "cache_mb": engine.cache.nbytes() / 2**20,
                "kv_tokens": stats["kv_tokens"], "per_gb": held / cache_gb, "slots_per_gb": slots_per_gb,
                "ratio": held / cache_gb / slots_per_gb}
    finally:
        engine.close()


def typed_trace(engine, texts: list[str], order: list[int], warm: int = 0) -> dict:
    """Type `order` (document indices, a word each keystroke); reuse and latency over keystrokes
    after the first `warm` ones and after each document's first."""
    seen, latencies, hits, counted, reused, prompt = {}, [], 0, 0, 0, 0
    for i, d in enumerate(order):
        texts[d] += f" w{i % 97}"
        timings, ms = keystroke(engine, texts[d], seed=i)
        length = timings.tokens_reused + timings.tokens_prefilled
        if d in seen and i >= warm:
            counted += 1
            hits += timings.tokens_reused >= seen[d] - 1
            reused += timings.tokens_reused
            prompt += length
            latencies.append(ms)
        seen[d] = length
    pool, blocks = engine.scheduler.pool, engine.cache.blocks
    runs = [len(blocks.runs(h, len(pool.held(h)))) for h in pool.document_slots()]
    return {"keystrokes": counted, "reused_document": hits / max(1, counted), "reuse_rate": reused / max(1, prompt),
            "runs_per_document": statistics.mean(runs) if runs else 0.0,
            "median_ms": statistics.median(latencies) if latencies else 0.0,
            "p95_ms": _pct(latencies, 95) if latencies else 0.0}


def round_robin(count: int, rounds: int) -> list[int]:
    return [d for _ in range(rounds + 1) for d in range(count)]


def bursty(active: int, idle: int, keystrokes: int, seed: int = 0) -> list[int]:
    """`active` writers type 80% of keystrokes; the rest go to one of `idle` documents at random.
    Every document is typed once first, so the trace starts with a full cache."""
    rng = random.Random(seed)
    order = list(range(active + idle))
    for _ in range(keystrokes):
        order.append(rng.randrange(active) if rng.random() < 0.8 else active + rng.randrange(idle))
    return order


def step_by_placement(engine, text: str, tokens: int = 900, steps: int = 7) -> dict:
    """Median decode step (ms) of 1 and 3 rows on a `tokens`-token document, its blocks consecutive
    and interleaved. Runs on the engine's model thread, on sequences its (idle) pool does not use."""
    import torch

    cache, runner = engine.cache, engine.scheduler.runner
    ids = engine.tokenizer.encode(text)[:tokens]
    first = cache.blocks.handles - 8  # idle pool: the last handles are never the first given out
    out = {"tokens": len(ids)}
    with torch.inference_mode():
        for layout in ("consecutive", "interleaved"):
            base, other, forks = first, first + 1, [first + 2, first + 3]
            if layout == "interleaved":  # each block of the document, then one of another sequence
                for end in range(cache.block_size, len(ids) + cache.block_size, cache.block_size):
                    cache.writable(base, 0, end)
                    cache.writable(other, 0, end)
            runner.prefill([ids], [0], [base], [0])
            for h in forks:
                runner.fork(base, h, len(ids))
            for rows in (1, 3):
                handles = [base] + forks[:rows - 1]
                shared = [(list(range(rows)), len(ids))] if rows > 1 else []
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    runner.decode(handles, [ids[-1]] * rows, [len(ids)] * rows, shared=shared)
                    times.append((time.perf_counter() - t0) * 1000)
                out[f"{layout}_{rows}_ms"] = statistics.median(times)
            out[f"{layout}_runs"] = len(cache.blocks.runs(base, len(ids)))
            for h in [base, other] + forks:
                cache.blocks.drop(h)
    return out


def many_writers(make_engine: Callable, document: Callable[[int, int], str], quick: bool = False,
                 lengths: tuple = LENGTHS, turn_length: int = TURN_LENGTH) -> dict:
    """`make_engine(**config)` gives a fresh engine with the bench's KV cache and these changes to its
    configuration (kv_eviction, kv_block). Documents of `lengths` tokens are fitted, the longest is
    the placement's, and `turn_length` is typed in turn."""
    engine = make_engine()
    try:
        longest = max(lengths)
        placement = engine.run_on_model_thread(lambda: step_by_placement(engine, document(longest, 123), longest))
    finally:
        engine.close()
    fits = [documents_that_fit(make_engine, document, n) for n in lengths]
    block64 = documents_that_fit(lambda: make_engine(kv_block=64), document, turn_length)
    fit = next(f["held"] for f in fits if f["tokens"] == turn_length)
    rounds = 2 if quick else 3
    turns = []
    for multiple in (1, 2, 4):
        count = max(1, fit * multiple)
        engine = make_engine()
        try:
            texts = [document(turn_length, 9000 + d) for d in range(count)]
            row = typed_trace(engine, texts, round_robin(count, rounds))
        finally:
            engine.close()
        turns.append({"multiple": multiple, "documents": count, **row})
    policies = []
    for policy in ("next-use", "lru"):
        for trace in ("round-robin", "bursty"):
            count = 2 * fit
            if trace == "round-robin":
                order, warm = round_robin(count, rounds), 0
            else:
                order = bursty(4, count, 40 if quick else 120)
                warm = count + 4
            engine = make_engine(kv_eviction=policy)
            try:
                texts = [document(turn_length, 11000 + d) for d in range(count + 4)]
                row = typed_trace(engine, texts, order, warm=warm)
            finally:
                engine.close()
            policies.append({"policy": policy, "trace": trace, "documents": count, **row})
    return {"fits": fits, "turns": turns, "policies": policies, "fit": fit, "placement": placement,
            "block64": block64, "turn_length": turn_length}


def format_report(result: dict) -> str:
    lines = []
    for f in result["fits"]:
        lines.append(f"   {f['tokens']:>4}-token documents: {f['held']} held in {f['cache_mb']:.0f} MB "
                     f"({f['kv_tokens']} positions) = {f['per_gb']:.1f} per GB of KV cache; whole-context slots "
                     f"{f['slots_per_gb']:.1f} per GB; {f['ratio']:.2f}x")
    for t in result["turns"]:
        lines.append(f"   {t['multiple']}x what fits ({t['documents']} documents of {result['turn_length']} tokens) in turn: "
                     f"{100 * t['reused_document']:.0f}% of keystrokes reused their document, "
                     f"{100 * t['reuse_rate']:.0f}% of prompt tokens; keystroke median {t['median_ms']:.0f} ms, "
                     f"p95 {t['p95_ms']:.0f} ms; held documents in {t['runs_per_document']:.1f} runs of blocks")
    for p in result["policies"]:
        lines.append(f"   {p['policy']:>8}, {p['trace']:<11} ({p['documents']} documents): "
                     f"{100 * p['reused_document']:.0f}% of keystrokes reused their document, "
                     f"keystroke median {p['median_ms']:.0f} ms")
    pl = result["placement"]
    lines.append(f"   {pl['tokens']}-token document, decode step of 1 / 3 suggestions: consecutive blocks ({pl['consecutive_runs']} "
                 f"run) {pl['consecutive_1_ms']:.1f} / {pl['consecutive_3_ms']:.1f} ms; interleaved "
                 f"({pl['interleaved_runs']} runs, gathered) {pl['interleaved_1_ms']:.1f} / "
                 f"{pl['interleaved_3_ms']:.1f} ms ({pl['interleaved_1_ms'] / pl['consecutive_1_ms']:.2f}x / "
                 f"{pl['interleaved_3_ms'] / pl['consecutive_3_ms']:.2f}x)")
    b16 = next(f for f in result["fits"] if f["tokens"] == result["turn_length"])
    b64 = result["block64"]
    lines.append(f"   {result['turn_length']}-token documents per GB: blocks of 16 positions {b16['per_gb']:.1f}, "
                 f"of 64 {b64['per_gb']:.1f}")
    return "\n".join(lines)
