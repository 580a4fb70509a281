"""`wwt bench --only writers`: many documents typed in turn against one engine.

Each of k documents (~300 tokens, all starting with the same word, as English texts often do)
gets a keystroke in turn: one word typed, then 3 suggestions x 8 tokens. The prefix cache must
keep every document's prefix while they fit in the slots, so each keystroke after a document's
first prefills only what was typed since. Printed per k: the reuse rate (tokens reused / prompt
tokens) and the median and p95 keystroke latency, with the ratio to k = 1.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

DOCUMENT_TOKENS = 300
SUGGESTIONS, NEW_TOKENS = 3, 8


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was really measured."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def many_writers(engine, document: Callable[[int, int], str], ks=(1, 4, 8, 16), rounds: int = 4) -> dict:
    """Type k documents in turn, `rounds` keystrokes each after a first cold one, for each k."""
    from model.types import CompletionRequest

    rows = []
    for k in ks:
        docs = [document(DOCUMENT_TOKENS, 5000 + 100 * k + d) for d in range(k)]
        latencies, reused, prompt = [], 0, 0
        for r in range(rounds + 1):
            for d in range(k):
                docs[d] += f" word{r}"
                request = CompletionRequest(text=docs[d], n=SUGGESTIONS, max_new_tokens=NEW_TOKENS, seed=r, stop=None)
                t0 = time.perf_counter()
                done = engine.complete(request)
                elapsed = (time.perf_counter() - t0) * 1000
                if r == 0:
                    continue  # a document's first keystroke has nothing to reuse
                latencies.append(elapsed)
                reused += done.timings.tokens_reused
                prompt += done.timings.tokens_reused + done.timings.tokens_prefilled
        rows.append({"documents": k, "reuse_rate": reused / prompt, "median_ms": statistics.median(latencies),
                     "p95_ms": _pct(latencies, 95), "keystrokes": len(latencies)})
    for row in rows:
        row["median_over_k1"] = row["median_ms"] / rows[0]["median_ms"]
    slots = engine.cache.slots
    per_slot = engine.cache.nbytes() / slots
    working = SUGGESTIONS - 1  # a request's other suggestions need slots of their own while it runs
    return {"rows": rows, "slots": slots, "slot_mb": per_slot / 2**20,
            "documents_that_fit": slots - working,
            "documents_per_gb": 2**30 / per_slot - working}


def format_report(result: dict) -> str:
    lines = [f"   {result['slots']} slots of {result['slot_mb']:.0f} MB: {result['documents_that_fit']} documents fit "
             f"with {SUGGESTIONS} suggestions each (about {result['documents_per_gb']:.1f} per GB of KV cache)"]
    for row in result["rows"]:
        lines.append(f"   {row['documents']:>2} documents: reuse {100 * row['reuse_rate']:.1f}%, keystroke median "
                     f"{row['median_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, median {row['median_over_k1']:.2f}x k=1")
    return "\n".join(lines)
