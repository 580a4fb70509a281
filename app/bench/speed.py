"""`wwt bench`: our engine against the reference (`transformers` generate), same weights, one run.

A report, not a test: it prints figures and ratios. Random weights at the real gpt2 size
(124M parameters, float32), a byte-level tokenizer with gpt2's vocabulary size, 2 threads.
The reference runs on the engine's model thread (`Engine.run_on_model_thread`), so both share one OpenMP
pool and neither pays for the other's idle threads (see model/serving/threads.py); this thread only
tokenizes, submits and times.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from model.serving.engine_config import EngineConfig
from model.serving.threads import in_fresh_thread

TARGETS = {
    "decode_speedup": 1.5,
    "keystroke_speedup": 8.0,
    "flatness_900_over_50": 1.5,
    "batching_speedup": 3.0,
}
WORDS = ("the quick brown fox jumps over a lazy dog while people write stories letters reports and poems "
         "about winter rivers markets robots libraries music science history gardens cities and the sea").split()


def synthetic_tokenizer(folder: Path, vocab_size: int = 50257) -> None:
    """vocab.json + merges.txt: the 256 byte symbols and pair merges up to gpt2's vocabulary size."""
    from model.network.tokenizer import _byte_decoder

    symbols = list(_byte_decoder())
    common = [chr(ord("Ġ"))] + [c for c in "etaoinshrdlcumwfgypbvkjxqz"] + \
             [c for c in "ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,!?'-:;"]
    order = common + [s for s in symbols if s not in common]
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    for a in order:
        for b in order:
            if len(vocab) >= vocab_size:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append(f"{a} {b}")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_checkpoint(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(bos_token_id=None, eos_token_id=None)  # no end-of-text: every run decodes its budget
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    synthetic_tokenizer(folder)


def document_text(tokenizer, tokens: int, salt: int) -> str:
    """A text of exactly `tokens` tokens of `tokenizer`; `salt` changes its start so documents do not
    share prefixes. Shared with the sizes report (sizes_measure.py), so both type the same documents."""
    words = [WORDS[(salt * 7 + i * 13) % len(WORDS)] for i in range(tokens)]
    text = f"Document {salt}: " + " ".join(words)
    return tokenizer.decode(tokenizer.encode(text)[:tokens])


def completion_request(text: str, n: int, new_tokens: int, greedy: bool, seed: int):
    """The request every timed call of the benchmarks makes: no stop rule, so each decodes its budget."""
    from model.types import CompletionRequest

    return CompletionRequest(text=text, n=n, max_new_tokens=new_tokens, greedy=greedy, seed=seed, stop=None,
                             top_p=0.9)


class Bench:
    def __init__(self, folder: Path, quick: bool, device: str = "cpu"):
        from transformers import GPT2LMHeadModel

        from model.serving.engine import Engine

        self.quick = quick
        self.repeats = 3 if quick else 5
        self.device = torch.device(device)
        self.engine = Engine.from_pretrained(str(folder), device=self.device, dtype=torch.float32,
                                             config=bench_config(slots=24))
        self.ref = self.engine.run_on_model_thread(
            lambda: GPT2LMHeadModel.from_pretrained(str(folder)).to(self.device).eval())
        self.tok = self.engine.tokenizer
        self.results: dict = {}

    # -- inputs --------------------------------------------------------------------------
    def document(self, tokens: int, salt: int) -> str:
        """A text of exactly `tokens` tokens; `salt` changes its start so documents do not share prefixes."""
        return document_text(self.tok, tokens, salt)

    def ref_generate(self, text: str, n: int, new_tokens: int, greedy: bool) -> float:
        ids = torch.tensor([self.tok.encode(text)], device=self.device)
        kwargs = dict(do_sample=not greedy, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      pad_token_id=0, eos_token_id=None, num_return_sequences=n)
        if not greedy:
            kwargs.update(top_p=0.9, top_k=0)

        def timed():
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.ref.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - t0

        return self.engine.run_on_model_thread(timed)

    def ours(self, text: str, n: int, new_tokens: int, greedy: bool, seed: int = 0, engine=None):
        t0 = time.perf_counter()
        done = (engine or self.engine).complete(self._request(text, n, new_tokens, greedy, seed))
        return time.perf_counter() - t0, done

    @staticmethod
    def _request(text, n, new_tokens, greedy, seed):
        return completion_request(text, n, new_tokens, greedy, seed)

    # -- sections ------------------------------------------------------------------------
    def decode_tok_s(self, engine=None, reference: bool = True) -> tuple[float, Optional[float]]:
        """Batch-1 greedy decode tokens/s (512-token prompt, 64 new: T(64) - T(1)), ours and the reference's."""
        new = 64
        ours, ref = [], []
        for r in range(self.repeats):
            text = self.document(512, 100 + r)
            self.ours(text, 1, 1, True, engine=engine)  # the prompt is prefilled once; both runs below reuse it
            t1 = self.ours(text + " x", 1, 1, True, engine=engine)[0]
            tn = self.ours(text + " x", 1, new, True, engine=engine)[0]
            ours.append((new - 1) / max(tn - t1, 1e-9))
            if reference:
                r1 = self.ref_generate(text, 1, 1, True)
                rn = self.ref_generate(text, 1, new, True)
                ref.append((new - 1) / max(rn - r1, 1e-9))
        return statistics.median(ours), (statistics.median(ref) if ref else None)

    def decode_speed(self) -> dict:
        """(1) batch-1 greedy decode: 512-token prompt, 64 new tokens; decode time = T(64) - T(1)."""
        o, f = self.decode_tok_s()
        self.reference_decode = f
        weights_ms = self.engine.run_on_model_thread(self.weights_pass_ms)
        return {"ours_tok_s": o, "reference_tok_s": f, "ratio": o / f, "target": TARGETS["decode_speedup"],
                "one_row_kernels": self.engine.stats()["one_row_kernels"], "weights_pass_ms": weights_ms,
                "bound_tok_s": 1000 / weights_ms, "bound_ratio": 1000 / weights_ms / f}

    def weights_pass_ms(self, engine=None) -> float:
        """One pass of one-row products over every matrix, in model order, with the kernels the
        engine chose: what a decode step cannot go below, since it reads every weight once."""
        from model.serving.quantize import QuantMatrix

        lm = (engine or self.engine).model
        # every linear layer of the body (plain, CPU or quantized: each has n_in), then the head
        modules = [m for m in lm.transformer.modules() if hasattr(m, "n_in") and not isinstance(m, QuantMatrix)]
        modules.append(lm.lm_head)
        rows = [torch.zeros(1, m.n_in, device=self.device, dtype=lm.transformer.wpe.weight.dtype) for m in modules]
        times = []
        with torch.inference_mode():
            for _ in range(self.repeats + 1):
                t0 = time.perf_counter()
                for module, row in zip(modules, rows):
                    module(row)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1000

    def keystroke(self, tokens: int, with_reference: bool = True, engine=None) -> dict:
        """(2, 3) a document already suggested for, then 3 more tokens typed: 3 suggestions x 8 tokens."""
        ours, ref, reused = [], [], []
        for r in range(self.repeats):
            doc = self.document(tokens, 1000 * tokens + r)
            self.ours(doc, 3, 8, False, seed=r, engine=engine)  # the suggestion shown before the person typed on
            typed = doc + " the sea"
            t, done = self.ours(typed, 3, 8, False, seed=r, engine=engine)
            ours.append(t * 1000)
            reused.append(done.timings.tokens_reused)
            if with_reference:
                ref.append(self.ref_generate(typed, 3, 8, False) * 1000)
        out = {"tokens": tokens, "ours_ms": statistics.median(ours), "tokens_reused": statistics.median(reused)}
        if ref:
            out.update(reference_ms=statistics.median(ref), ratio=statistics.median(ref) / out["ours_ms"])
        return out

    def batching(self) -> dict:
        """(4) 8 concurrent callers x 3 suggestions: aggregate tokens/s, batched vs one at a time."""
        callers, new = 8, 32

        def prompts(salt):
            return [self.document(24, salt * 100 + i) for i in range(callers)]

        def run_one(text, i):
            return self.engine.complete(self._request(text, 3, new, False, i))

        def concurrent(salt):
            done = [None] * callers
            threads = [threading.Thread(target=lambda i=i, t=t: done.__setitem__(i, run_one(t, i)))
                       for i, t in enumerate(prompts(salt))]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            return sum(len(s.token_ids) for d in done for s in d.suggestions) / wall

        def serial(salt):
            t0 = time.perf_counter()
            tokens = sum(len(s.token_ids) for i, t in enumerate(prompts(salt)) for s in run_one(t, i).suggestions)
            return tokens / (time.perf_counter() - t0)

        reps = max(2, self.repeats - 2)
        concurrent(6999)  # warm-up: the first batch of 24 rows builds oneDNN's kernels for its shapes
        batched = statistics.median(concurrent(7000 + r) for r in range(reps))
        alone = statistics.median(serial(8000 + r) for r in range(reps))
        return {"batched_tok_s": batched, "one_at_a_time_tok_s": alone, "ratio": batched / alone,
                "max_batch": self.engine.stats()["max_batch"], "target": TARGETS["batching_speedup"]}

    def precisions(self, folder: Path, names: list[str]) -> dict:
        """(8) each quantized precision against our float32 engine and the float32 reference, same weights."""
        from model.serving.engine import Engine
        from model.serving.quantize import weight_bytes

        reference = getattr(self, "reference_decode", None)
        if reference is None:
            _, reference = self.decode_tok_s(reference=True)
        f32_decode, _ = self.decode_tok_s(reference=False)
        f32_key = self.keystroke(900, with_reference=False)["ours_ms"]
        f32_bytes = weight_bytes(self.engine.model)  # the float32 matrices, without the packed copies
        rows = [{"precision": "float32", "decode_tok_s": f32_decode, "decode_ratio": f32_decode / reference,
                 "keystroke_ms": f32_key, "keystroke_share": 1.0, "weight_mb": f32_bytes / 2**20,
                 "weight_share": 1.0}]
        for name in names:
            engine = Engine.from_pretrained(f"{folder}@{name}", device=self.device,
                                            config=bench_config(slots=24))
            try:
                tok_s, _ = self.decode_tok_s(engine, reference=False)
                pass_ms = engine.run_on_model_thread(lambda: self.weights_pass_ms(engine))
                key = self.keystroke(900, with_reference=False, engine=engine)["ours_ms"]
                weights = weight_bytes(engine.model)
                rows.append({"precision": name, "decode_tok_s": tok_s, "decode_ratio": tok_s / reference,
                             "bound_tok_s": 1000 / pass_ms, "of_bound": tok_s / (1000 / pass_ms),
                             "keystroke_ms": key, "keystroke_share": key / f32_key,
                             "weight_mb": weights / 2**20, "weight_share": weights / f32_bytes,
                             "cache_mb": engine.cache.nbytes() / 2**20})
            finally:
                engine.close()
        return {"reference_tok_s": reference, "rows": rows,
                "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def memory(self) -> dict:
        """(5) the engine's weights and cache pool, and this process's peak resident memory."""
        weights = self.engine.memory_bytes() - self.engine.cache.nbytes()
        ref = sum(p.numel() * p.element_size() for p in self.ref.parameters())
        return {"engine_weights_mb": weights / 2**20, "cache_pool_mb": self.engine.cache.nbytes() / 2**20,
                "rows": self.engine.rows, "kv_tokens": self.engine.cache.tokens, "engine_total_mb": self.engine.memory_bytes() / 2**20,
                "reference_weights_mb": ref / 2**20,
                "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_config(slots=None) -> EngineConfig:
    """The engine configuration the user's settings describe (kernels, packing: `wwt bench` is an
    entry point), with `slots` and every request let in: it measures speed, not refusals."""
    return EngineConfig.from_settings().with_(slots=slots).unbounded()


def _print(results: dict) -> None:
    d = results.get("decode")
    if d:
        print(f"1. decode, batch 1, 512-token prompt, 64 new tokens: ours {d['ours_tok_s']:.1f} tok/s, "
              f"reference {d['reference_tok_s']:.1f} tok/s, ratio {d['ratio']:.2f}x (target >= {d['target']}x)")
        kernels = ", ".join(f"{part} {kind}" for part, kind in d["one_row_kernels"].items())
        print(f"   one pass over the weights ({kernels}): {d['weights_pass_ms']:.1f} ms, so at most "
              f"{d['bound_tok_s']:.1f} tok/s = {d['bound_ratio']:.2f}x the reference on this machine")
    k = results.get("keystroke")
    if k:
        print(f"2. keystroke at 900 tokens (3 typed, 3 x 8 tokens): ours {k['ours_ms']:.0f} ms "
              f"(reused {k['tokens_reused']:.0f} tokens), reference {k['reference_ms']:.0f} ms, "
              f"ratio {k['ratio']:.1f}x (target >= {TARGETS['keystroke_speedup']}x)")
    f = results.get("flatness")
    if f:
        rows = ", ".join(f"{r['tokens']} tokens {r['ours_ms']:.0f} ms" for r in f["rows"])
        print(f"3. keystroke latency by document length: {rows}; 900/50 = {f['ratio']:.2f} "
              f"(target <= {TARGETS['flatness_900_over_50']})")
    b = results.get("batching")
    if b:
        print(f"4. 8 callers x 3 suggestions: batched {b['batched_tok_s']:.0f} tok/s, one at a time "
              f"{b['one_at_a_time_tok_s']:.0f} tok/s, ratio {b['ratio']:.2f}x (target >= {b['target']}x; "
              f"largest batch {b['max_batch']} rows)")
    m = results.get("memory")
    if m:
        print(f"5. memory: weights {m['engine_weights_mb']:.0f} MB + cache pool {m['cache_pool_mb']:.0f} MB "
              f"({m['kv_tokens']} positions) = {m['engine_total_mb']:.0f} MB; reference weights "
              f"{m['reference_weights_mb']:.0f} MB; process peak RSS {m['process_peak_rss_mb']:.0f} MB")
    w = results.get("writers")
    if w:
        from .writers import format_report as writers_report

        print("7. many writers (3 x 8 suggestions a keystroke):\n"
              + writers_report(w))
    p = results.get("precisions")
    if p:
        print(f"8. precisions (same weights; reference = float32 transformers at {p['reference_tok_s']:.1f} tok/s):")
        for row in p["rows"]:
            bound = (f", {100 * row['of_bound']:.0f}% of its weight-pass bound ({row['bound_tok_s']:.0f} tok/s)"
                     if "of_bound" in row else "")
            print(f"   {row['precision']:>8}: decode {row['decode_tok_s']:.1f} tok/s = {row['decode_ratio']:.2f}x the "
                  f"reference{bound}; keystroke at 900 tokens {row['keystroke_ms']:.0f} ms = "
                  f"{100 * row['keystroke_share']:.0f}% of our float32; weights {row['weight_mb']:.0f} MB = "
                  f"{100 * row['weight_share']:.0f}% of float32")
        print(f"   process peak RSS {p['process_peak_rss_mb']:.0f} MB")
    q = results.get("queue")
    if q:
        from .queue_path import format_report

        print("6. queue path over the embedded path:\n" + format_report(q))


def run_bench(args) -> int:
    torch.set_num_threads(2)
    only = {s for s in (args.only or "").split(",") if s}
    want = lambda name: not only or name in only  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if getattr(args, "checkpoint", None):
            folder = Path(args.checkpoint)
        else:
            in_fresh_thread(make_checkpoint, folder)  # leaves no OpenMP pool behind in this thread
        bench = Bench(folder, args.quick, getattr(args, "device", None) or "cpu")
        results = {"threads": torch.get_num_threads(), "quick": bool(args.quick), "device": str(bench.device)}
        if want("decode"):
            results["decode"] = bench.decode_speed()
        if want("keystroke"):
            results["keystroke"] = bench.keystroke(900)
        if want("flatness"):
            rows = [bench.keystroke(t, with_reference=False) for t in (50, 300, 900)]
            results["flatness"] = {"rows": rows, "ratio": rows[-1]["ours_ms"] / rows[0]["ours_ms"]}
        if want("batching"):
            results["batching"] = bench.batching()
        if want("memory"):
            results["memory"] = bench.memory()
        if want("precisions"):
            names = [n for n in (getattr(args, "dtype", None) or "int8,int4").split(",") if n]
            results["precisions"] = bench.precisions(folder, names)
        if want("writers"):
            from model.serving.engine import Engine

            from .writers import many_writers

            kv_tokens = 4096 if args.quick else 16384

            def writers_engine(**changes):
                config = bench_config().with_(kv_tokens=kv_tokens, rows=16, **changes)
                return Engine.from_pretrained(str(folder), device=bench.device, dtype=torch.float32, config=config)

            results["writers"] = many_writers(writers_engine, bench.document, quick=args.quick)
        bench.engine.close()  # its thread and OpenMP pool go; the queue section makes its own engine
        if want("queue") and (getattr(args, "redis_url", None) or shutil.which("redis-server")):
            from .queue_path import bench_queue

            # Without a URL it starts a throwaway redis-server; the worker gets the same 2 threads.
            results["queue"] = bench_queue(args.redis_url, str(folder), bench.repeats, threads=2)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0
