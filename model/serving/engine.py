"""The Engine: one model, its tokenizer and its KV-cache pool, serving many callers at once.

Completions go through the batching scheduler (scheduler.py) and its prefix cache;
classification, question answering and per-token scores are single forward passes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..contract import MAX_LABELS, check_setting, clean_text, narrowed
from ..errors import BadRequest, CheckpointError
from ..network.known import parse_model_spec
from ..network.tokenizer import load_tokenizer_folder
from ..network.weights import resolve_checkpoint
from ..types import (Answer, Classification, Completion, CompletionRequest, CompletionUpdate, LabelScore,
                     PartialSuggestion, Scores, Suggestion, Timings, TokenScore)
from .autocomplete import build_prompt
from .raw_text import raw_prompt, token_pieces, token_text
from .cpu_kernels import packed_bytes, prepare_for_cpu
from .decode_graph import FixedShapeDecoder
from .engine_config import EngineConfig
from .kv_cache import KVCache
from .loading import default_device, load_with_heads_at
from .quantize import FLOATS, QUANTIZED, int8_kernel_in_use, precision_name, weight_bytes
from .sampling import SamplingSettings
from .jobs import Handle, Job
from .scheduler import Scheduler
from .threads import in_fresh_thread

MAX_ANSWER_TOKENS = 30
ZERO_SHOT_SUFFIX = "\nThis text is about"  # zero-shot prompt: the text, then this, then " <label>"


def default_slots(config, device: torch.device, dtype: torch.dtype) -> int:
    """Enough sequences for a few people typing at once, within a fixed share of memory."""
    per_slot = config.kv_cache_bytes(1, bytes_per_value=torch.finfo(dtype).bits // 8)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(4, min(64, free * 0.3 // per_slot)))
    return int(max(4, min(16, (2 << 30) // per_slot)))


def kv_sizes(config: EngineConfig, network, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(rows a step runs, positions the KV cache holds): the configuration's, else `slots` of the
    whole context, else what default_slots picks by device (today's default memory)."""
    slots = config.slots or default_slots(network, device, dtype)
    rows = config.rows or slots
    kv_tokens = config.kv_tokens or slots * network.n_positions
    if rows < 1 or kv_tokens < 1:
        raise ValueError("the KV cache needs at least one row and one position")
    return rows, kv_tokens


def kv_cache_dtype(choice: str, precision: str, compute: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: `choice` (float32, bfloat16, float16), or ("auto") bfloat16 for a
    quantized model on a CPU, the compute dtype otherwise.

    A long document's decode step reads its whole cache; bfloat16 halves those bytes and holds
    twice the documents per GB, and torch's CPU attention kernel reads it directly. A quantized
    model already differs from float32 by more than bfloat16 keys do (the fidelity table in
    docs/performance.md has both); a float32 model keeps a float32 cache and its parity with the
    reference."""
    if choice and choice != "auto":
        if choice not in FLOATS:
            raise ValueError(f"unknown KV cache dtype {choice!r}; choose auto or one of {', '.join(FLOATS)}")
        return FLOATS[choice]
    if device.type == "cpu" and precision in QUANTIZED:
        return torch.bfloat16
    return compute


class Engine:
    def __init__(self, lm, heads: dict, tokenizer, name: str, config: Optional[EngineConfig] = None,
                 precision: Optional[str] = None):
        config = config or EngineConfig()
        self.engine_config = config  # how it was set up (EngineConfig); self.config is the network's
        self.name = name
        self.model = lm
        self.config = lm.config
        self.tokenizer = tokenizer
        self.extra_heads = heads
        self.dtype = lm.transformer.wpe.weight.dtype  # the float compute dtype
        self.precision = precision or precision_name(self.dtype)
        self.kv_dtype = kv_cache_dtype(config.kv_dtype, self.precision, self.dtype, self.device)
        # CPU float32: a oneDNN-packed copy of each matrix in place of the plain one (cpu_pack=False: plain
        # only), and the LM head's one-row kernel timed fastest on this machine (cpu_one_row names one).
        # Setup runs in a thread that exits afterwards, so it leaves no OpenMP pool behind (threads.py).
        cpu = in_fresh_thread(prepare_for_cpu, lm, config.cpu_pack, config.cpu_one_row)
        self.packed, self.one_row_kernels = cpu["packed"], cpu["one_row_kernels"]
        self.rows, kv_tokens = kv_sizes(config, self.config, self.device, self.kv_dtype)
        cuda_graph = self.device.type == "cuda" if config.cuda_graph is None else config.cuda_graph
        block = config.kv_block
        if cuda_graph:  # the fixed-shape step parks its idle rows in a block of their own
            kv_tokens += block
        handles = -(-kv_tokens // block) + self.rows  # every block held by its own document, and the rows
        self.cache = in_fresh_thread(KVCache, self.config, tokens=kv_tokens, handles=handles, dtype=self.kv_dtype,
                                     device=self.device, block_size=block)
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.config.eos_token_id
        fixed = FixedShapeDecoder(lm, self.cache, self.rows, capture=self.device.type == "cuda") if cuda_graph else None
        self.scheduler = Scheduler(lm, tokenizer, self.cache, fixed, name=name, rows=self.rows,
                                   eviction=config.kv_eviction, max_waiting=config.max_waiting,
                                   max_waiting_per_client=config.max_waiting_per_client,
                                   max_wait_s=config.max_wait_s)

    @property
    def device(self) -> torch.device:
        """Where the weights, the cache and every step live."""
        return self.model.device

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=None, config: Optional[EngineConfig] = None, *,
                        name: Optional[str] = None, revision: Optional[str] = None,
                        cache_dir: Optional[str] = None, offline: Optional[bool] = None,
                        slots: Optional[int] = None, kv_tokens: Optional[int] = None,
                        cuda_graph: Optional[bool] = None) -> "Engine":
        """Load a short name, Hub repo id, local folder or `name=source` spec, optionally `spec@precision`.

        Precision: the spec's own, else `dtype` (float32, bfloat16, float16, int8, int4, nf4, or a
        torch float dtype), else float16 on CUDA and float32 on CPU. Quantized precisions are made
        at load time from the ordinary checkpoint. `config` sets the engine up (the defaults: the
        production policy); `slots`, `kv_tokens` and `cuda_graph` are shorthands for those fields of it
        (`cuda_graph=True` on CPU runs the GPU's fixed-shape step eagerly).
        """
        config = config or EngineConfig()
        if slots is not None:
            config = config.with_(slots=slots)
        if kv_tokens is not None:
            config = config.with_(kv_tokens=kv_tokens)
        if cuda_graph is not None:
            config = config.with_(cuda_graph=cuda_graph)
        spec = parse_model_spec(name_or_path)
        device = torch.device(device) if device is not None else default_device()
        try:
            precision = precision_name(spec.precision or dtype)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        folder = resolve_checkpoint(spec.source, revision, cache_dir, offline)
        try:
            lm, heads, precision = in_fresh_thread(load_with_heads_at, Path(folder), precision, device,
                                                   config.cpu_int8)
        except ValueError as e:  # a matrix this precision cannot hold (say, 4 bits over an odd width)
            raise CheckpointError(f"cannot load {spec.name} in {precision}: {e}") from None
        tokenizer = load_tokenizer_folder(Path(folder), lm.config.model_type)
        return cls(lm, heads, tokenizer, name or spec.name, config, precision)

    # -- completion ----------------------------------------------------------------------
    def _job(self, request: CompletionRequest) -> Job:
        r = narrowed(request, max_n=self.rows, max_new_tokens=self.config.n_positions // 2)
        if r.raw:
            prompt = raw_prompt(self.tokenizer, r.text, self.config.n_positions, r.max_new_tokens, self.eos)
        else:
            prompt = build_prompt(self.tokenizer, r.text, self.config.n_positions - r.max_new_tokens, self.eos)
        sampling = SamplingSettings(r.greedy, r.temperature, r.top_k, r.top_p, r.repetition_penalty,
                                    r.presence_penalty, r.frequency_penalty)
        return Job(prompt, r.n, r.max_new_tokens, sampling, r.seed, r.max_time, r.stop, self.eos,
                   raw=r.raw, top_logprobs=r.logprobs)

    def submit(self, request: CompletionRequest, client: Optional[str] = None) -> Handle:
        """Queue a completion; the handle waits for it or cancels it.

        Raises Busy at once, queueing nothing, past the engine's admission bounds (EngineConfig):
        max_waiting requests already wait for slots, max_waiting_per_client of them come from
        `client` (an IP address or an editor id; None: not counted per client), or the work
        already in the engine would take longer than max_wait_s.
        """
        return self.scheduler.submit(self._job(request), client)

    def complete(self, request: CompletionRequest, timeout: Optional[float] = None,
                 client: Optional[str] = None) -> Completion:
        """Submit a completion and wait for its answer: `result(submit(request, client), timeout)`."""
        return self.result(self.submit(request, client), timeout)

    def result(self, handle: Handle, timeout: Optional[float] = None) -> Completion:
        """Wait for a submitted request (cancelling it if `timeout` passes) and package its answer."""
        suggestions, timings = handle.result(timeout)
        prompt = handle.job.prompt
        return Completion(model=self.name, suggestions=suggestions, timings=timings,
                          healed=prompt.heal.decode("utf-8", errors="replace"),
                          prompt_tokens=len(prompt.tokens) + bool(prompt.heal))

    def stream(self, handle: Handle, timeout: Optional[float] = None) -> Iterator[CompletionUpdate]:
        """Updates of a submitted request: its suggestions after each step that changed them, then
        one last update whose `completion` is the answer `result` gives (authoritative; what
        partial texts promise is in model/streaming.py). Raises what `result` raises.

        Closing the iterator before the end (a reader that went away) cancels the request, which
        frees its slots at the next step.
        """
        try:
            for suggestions in handle.updates(timeout):
                yield CompletionUpdate(suggestions=list(suggestions))
            completion = self.result(handle)
        finally:
            if not handle.done():
                handle.cancel()
        final = [PartialSuggestion(index=i, text=s.text, finished=True, finish_reason=s.finish_reason)
                 for i, s in enumerate(completion.suggestions)]
        if handle.job.top_logprobs is not None:
            for partial, s in zip(final, completion.suggestions):
                partial.token_ids, partial.logprobs = list(s.token_ids), list(s.logprobs)
                partial.tokens, partial.top_logprobs = list(s.tokens), list(s.top_logprobs)
        yield CompletionUpdate(suggestions=final, completion=completion)

    def run_on_model_thread(self, fn):
        """fn() on the engine's model thread, between batching steps: its result, or its exception.

        Torch work that shares the engine's thread shares its OpenMP pool (see threads.py);
        the benchmark runs the reference model this way too.
        """
        return self.scheduler.call(fn)

    # -- single forward passes (on the model thread) -------------------------------------
    def _forward(self, module, ids: list[list[int]], attention_mask=None):
        x = torch.tensor(ids, device=self.device)
        mask = None if attention_mask is None else torch.tensor(attention_mask, device=self.device)
        with torch.inference_mode():
            return module(x, mask)

    def _text_ids(self, text: str, limit: int) -> list[int]:
        text = clean_text(text, required=True)
        return self.tokenizer.encode(text, max_tokens=limit)

    def classify(self, text: str, labels: Optional[list] = None) -> Classification:
        """Label probabilities: the checkpoint's classifier, or zero-shot over `labels` with the LM."""
        return self.run_on_model_thread(lambda: self._classify(text, labels))

    def _classify(self, text: str, labels: Optional[list]) -> Classification:
        t0 = time.perf_counter()
        labels = [clean_text(str(l), "label").strip() for l in (labels or [])]
        labels = [l for l in labels if l]
        if len(labels) > MAX_LABELS:
            raise BadRequest(f"at most {MAX_LABELS} candidate labels")
        if len(set(labels)) != len(labels):
            raise BadRequest("candidate labels must be distinct")
        if labels:
            if len(labels) < 2:
                raise BadRequest("give at least two candidate labels")
            scores, method = self._zero_shot(text, labels), "zero-shot"
        elif "sequence-classification" in self.extra_heads:
            ids = self._text_ids(text, self.config.n_positions)
            logits = self._forward(self.extra_heads["sequence-classification"], [ids])[0].float()
            probs = logits.softmax(-1).tolist()
            names = self.config.id2label
            scores, method = [(names.get(i, f"LABEL_{i}"), p) for i, p in enumerate(probs)], "head"
        else:
            raise BadRequest(f"{self.name} has no classification head: give candidate labels for zero-shot "
                             f"classification")
        scores.sort(key=lambda x: -x[1])
        ms = (time.perf_counter() - t0) * 1000
        return Classification(model=self.name, labels=[LabelScore(l, float(p)) for l, p in scores], method=method,
                              timings=Timings(total_ms=ms, tokens_prefilled=0))

    def _zero_shot(self, text: str, labels: list[str]) -> list[tuple[str, float]]:
        """P(label | text) by the LM: mean log-likelihood of each label's tokens after a prompt."""
        label_ids = [self.tokenizer.encode(" " + l) for l in labels]
        longest = max(len(l) for l in label_ids)
        suffix = self.tokenizer.encode(ZERO_SHOT_SUFFIX)
        room = self.config.n_positions - len(suffix) - 1  # at least one token of the text stays
        if longest > room:
            raise BadRequest(f"a candidate label is {longest:,} tokens long; {self.name} reads labels of at most "
                             f"{room:,} tokens (its context is {self.config.n_positions:,})")
        body = self._text_ids(text, self.config.n_positions - longest - len(suffix))
        prompt = body + suffix
        rows = [prompt + l + [0] * (longest - len(l)) for l in label_ids]
        mask = [[1] * (len(prompt) + len(l)) + [0] * (longest - len(l)) for l in label_ids]
        logp = self._forward(self.model, rows, mask).float().log_softmax(-1)
        scores = []
        for i, l in enumerate(label_ids):
            lp = sum(float(logp[i, len(prompt) - 1 + j, tok]) for j, tok in enumerate(l))
            scores.append(lp / len(l))
        probs = torch.tensor(scores).softmax(-1).tolist()
        return list(zip(labels, probs))

    def answer(self, question: str, context: str) -> Answer:
        """The answer span of the checkpoint's QA head, or an answer the LM generates (marked so)."""
        t0 = time.perf_counter()
        question = clean_text(question, "question", required=True)
        context = clean_text(context, "context", required=True)
        if "question-answering" in self.extra_heads:
            result = self.run_on_model_thread(lambda: self._extract(question, context))
        else:
            result = self._generate_answer(question, context)
        result.timings.total_ms = (time.perf_counter() - t0) * 1000
        return result

    def _extract(self, question: str, context: str) -> Answer:
        joined = f"{question}\n{context}"
        offset = len(question) + 1
        ids, spans = self.tokenizer.encode_with_offsets(joined)
        ids, spans = ids[: self.config.n_positions], spans[: self.config.n_positions]
        start_logits, end_logits = self._forward(self.extra_heads["question-answering"], [ids])
        in_context = torch.tensor([s >= offset for s, _ in spans])
        if not bool(in_context.any()):
            raise BadRequest("the question leaves no room for the context in the model's window")
        neg = float("-inf")
        ps = start_logits[0].float().masked_fill(~in_context, neg).softmax(-1)
        pe = end_logits[0].float().masked_fill(~in_context, neg).softmax(-1)
        joint = ps[:, None] * pe[None, :]
        T = len(ids)
        valid = torch.ones(T, T, dtype=torch.bool).triu() & ~torch.ones(T, T, dtype=torch.bool).triu(MAX_ANSWER_TOKENS)
        joint = joint.masked_fill(~valid, 0.0)
        best = int(torch.argmax(joint))
        s, e = divmod(best, T)
        start, end = spans[s][0] - offset, spans[e][1] - offset
        while start < end and context[start].isspace():
            start += 1
        while end > start and context[end - 1].isspace():
            end -= 1
        return Answer(model=self.name, text=context[start:end], score=float(joint[s, e]), start=start, end=end,
                      generated=False, timings=Timings())

    def _generate_answer(self, question: str, context: str) -> Answer:
        prompt = f"{context.strip()}\n\nQuestion: {question.strip()}\nAnswer:"
        request = CompletionRequest(text=prompt, n=1, max_new_tokens=24, greedy=True, stop=["\n"])
        done = self.complete(request)
        best = done.suggestions[0] if done.suggestions else Suggestion(text="")
        text = best.text.strip()
        score = math.exp(sum(best.logprobs) / len(best.logprobs)) if best.logprobs else 0.0
        at = context.lower().find(text.lower()) if text else -1
        return Answer(model=self.name, text=text, score=score, start=at if at >= 0 else None,
                      end=at + len(text) if at >= 0 else None, generated=True, timings=done.timings)

    def score(self, text: str, top_logprobs: int = 0) -> Scores:
        """Each token of `text` with the probability and rank the model gave it (and, with
        `top_logprobs`, that many of the likeliest tokens in its place)."""
        top_logprobs = check_setting("logprobs", top_logprobs) or 0
        return self.run_on_model_thread(lambda: self._score(text, top_logprobs))

    def _score(self, text: str, top_logprobs: int = 0) -> Scores:
        t0 = time.perf_counter()
        budget = self.config.n_positions - (1 if self.eos is not None else 0)
        ids = self._text_ids(text, budget)
        inputs = ([self.eos] if self.eos is not None else []) + ids
        logits = self._forward(self.model, [inputs])[0].float()
        shift = 1 if self.eos is not None else 0
        out = []
        for i, (tok, piece) in enumerate(zip(ids, self._token_texts(ids))):
            j = i + shift - 1
            if j < 0:
                out.append(TokenScore(piece, tok, 1.0, 0))
                continue
            row = logits[j]
            logp = row.log_softmax(-1)
            score = TokenScore(piece, tok, float(logp[tok].exp()), int((row > row[tok]).sum()) + 1, float(logp[tok]))
            if top_logprobs:
                top = torch.topk(logp, top_logprobs)
                score.top_logprobs = [[token_text(self.tokenizer, int(t)), float(v)] for t, v in zip(top.indices, top.values)]
            out.append(score)
        ms = (time.perf_counter() - t0) * 1000
        return Scores(model=self.name, tokens=out, timings=Timings(total_ms=ms, tokens_prefilled=len(inputs)))

    def _token_texts(self, ids: list[int]) -> list[str]:
        """Each token's share of the text: a character split over several tokens goes to the last one,
        so the pieces join back into the text (raw_text.token_pieces)."""
        if not self.tokenizer.byte_level:
            return [self.tokenizer.decode([t]) for t in ids]
        return token_pieces(self.tokenizer, ids)


    # -- bookkeeping ---------------------------------------------------------------------
    def stats(self) -> dict:
        return {**self.scheduler.counters, **self.scheduler.cache_stats(), "precision": self.precision,
                "weight_bytes": self.weight_bytes(), "cache_bytes": self.cache.nbytes(),
                "memory_bytes": self.memory_bytes(), "one_row_kernels": dict(self.one_row_kernels),
                "int8_kernel": int8_kernel_in_use(self.model), "kv_dtype": str(self.kv_dtype).replace("torch.", "")}

    def kv_gauges(self) -> dict:
        """What /metrics shows of the KV cache: positions used and free, evictions so far, and the
        prompt tokens reused and prefilled so far (their ratio is the reuse rate)."""
        kv, counters = self.scheduler.cache_stats(), self.scheduler.counters
        return {"kv_tokens_used": kv["kv_tokens_used"], "kv_tokens_free": kv["kv_tokens_free"],
                "kv_evictions": kv["evictions"], "tokens_reused": counters["tokens_reused"],
                "tokens_prefilled": counters["tokens_prefilled"]}

    def weight_bytes(self) -> int:
        """The weights in memory: the model's (quantized or not, with any CPU packed copies) and the
        extra heads' own layers."""
        own = sum(p.numel() * p.element_size() for h in self.extra_heads.values()
                  for n, p in h.named_parameters() if not n.startswith("transformer."))
        return weight_bytes(self.model) + packed_bytes(self.model) + own

    def memory_bytes(self) -> int:
        return self.weight_bytes() + self.cache.nbytes()

    def close(self) -> None:
        self.scheduler.close()
