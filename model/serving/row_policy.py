"""What happens to each generated row: which token it may take, and when it is done.

Per row: the token-healing mask (the first tokens spell out what was typed), the repetition
penalty, no empty suggestion, the stop rules. Per request: the suggestions kept are distinct
and non-empty, and are cleaned of control characters. The model never appears here: this
works on logits.
"""

from __future__ import annotations

import torch

from ..contract import clean_output, suggestion_key
from ..network.tokenizer import GPTTokenizer
from ..types import Suggestion
from .autocomplete import HealingMasks, apply_stop, continuation
from .jobs import Job, Row
from .raw_text import PieceWriter, token_text
from .sampling import apply_presence_frequency, apply_repetition_penalty, sample_rows


class RowPolicy:
    def __init__(self, tokenizer: GPTTokenizer, vocab_size: int, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length  # a row stops when its sequence fills the context
        self.healing = HealingMasks(tokenizer, vocab_size) if tokenizer.byte_level else None

    def take(self, rows: list[tuple[Job, Row]], logits: torch.Tensor) -> None:
        """Choose each row's next token from its logits [B, V] (one sampling pass for the batch)."""
        adjust = any(job.settings.repetition_penalty != 1.0 or row.pending or not row.tokens
                     or job.settings.presence_penalty or job.settings.frequency_penalty for job, row in rows)
        scores = logits.clone() if adjust else logits
        for b, (job, row) in enumerate(rows):
            if not adjust:
                break
            s = job.settings
            if s.repetition_penalty != 1.0:
                seen = torch.tensor(job.prompt.tokens + row.tokens, dtype=torch.long)
                scores[b] = apply_repetition_penalty(scores[b], seen, s.repetition_penalty)
            scores[b] = apply_presence_frequency(scores[b], row.tokens, s.presence_penalty, s.frequency_penalty)
            if row.pending and self.healing is not None:
                scores[b] = scores[b].masked_fill(~self.healing.mask(row.pending), float("-inf"))
            if not row.tokens and job.stop == "auto" and job.eos is not None:
                scores[b, job.eos] = float("-inf")  # a suggestion is never empty
        # greedy rows of a page request start from the 1st, 2nd, ... likeliest token (distinct
        # suggestions); raw rows are n independent runs of the same request
        tokens = sample_rows(scores, [job.settings for job, _ in rows], [row.generator for _, row in rows],
                             [row.index if not row.tokens and not job.raw else 0 for job, row in rows])
        norm = torch.logsumexp(logits, -1)
        chosen = logits[torch.arange(len(rows)), torch.tensor(tokens)]
        logprobs = (chosen - norm).tolist()  # log-softmax of the chosen tokens only
        for b, ((job, row), token, logprob) in enumerate(zip(rows, tokens, logprobs)):
            if job.top_logprobs:  # the likeliest tokens of the model's own distribution, as OpenAI reports them
                top = torch.topk(logits[b], job.top_logprobs)
                row.top.append([[token_text(self.tokenizer, int(t)), float(v)] for t, v in zip(top.indices, top.values - norm[b])])
            elif job.top_logprobs is not None:
                row.top.append([])
            self.accept(job, row, token, logprob)

    def accept(self, job: Job, row: Row, token: int, logprob: float) -> None:
        """Append the chosen token and decide whether the row is done."""
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if row.pending:
            b = self.tokenizer.token_bytes(token)
            row.pending = b"" if b.startswith(row.pending) else row.pending[len(b):]
        if token == job.eos:
            row.tokens.pop()
            row.logprobs.pop()
            if row.top:
                row.top.pop()
            self.end(job, row, "eos")
        elif job.raw:
            if row.writer is None:
                row.writer = PieceWriter(self.tokenizer, job.prompt)
            row.writer.add(row.pieces, row.tokens)
            row.text, stopped = apply_stop("".join(row.pieces), job.stop)
            if stopped:
                self.end(job, row, "stop")
        elif not row.pending:
            text, stopped = apply_stop(self._text(job, row), job.stop)
            row.text = text
            if stopped:
                self.end(job, row, "stop")
        if row.finish is None and len(row.tokens) >= job.max_new_tokens:
            self.end(job, row, "length")
        if row.finish is None and len(job.prompt.tokens) + len(row.tokens) >= self.max_length:
            self.end(job, row, "length")

    def end(self, job: Job, row: Row, reason: str) -> None:
        row.finish = reason
        if job.raw:
            if row.writer is not None:
                row.writer.finish(row.pieces)
            if reason != "stop":
                row.text = apply_stop("".join(row.pieces), job.stop)[0]
            self._cut_at_text(job, row)
        elif reason in ("eos", "time", "cancelled", "length") and not row.pending:
            row.text = apply_stop(self._text(job, row), job.stop)[0]

    @staticmethod
    def _cut_at_text(job: Job, row: Row) -> None:
        """A stop string cut the text: keep the tokens that begin before the cut (the last may reach
        past it), so every token kept starts inside the text."""
        if row.finish != "stop":
            return
        start, keep = 0, 0
        for piece in row.pieces:
            if start >= len(row.text):
                break
            keep += 1
            start += len(piece)
        del row.pieces[keep:], row.top[keep:]
        row.kept_tokens = keep

    def _text(self, job: Job, row: Row) -> str:
        return clean_output(continuation(self.tokenizer, job.prompt, row.tokens))

    @staticmethod
    def collect(job: Job) -> int:
        """Keep the finished rows' distinct, non-empty suggestions (raw mode: every row, as it is);
        how many are still missing."""
        for row in sorted(job.rows, key=lambda r: r.index):
            if row.kept is not None or row.finish is None:
                continue
            if job.raw:
                row.kept = True
                keep = row.kept_tokens if row.kept_tokens is not None else len(row.tokens)
                job.accepted.append(Suggestion(text=row.text, token_ids=row.tokens[:keep], logprobs=row.logprobs[:keep],
                                               finish_reason=row.finish, tokens=list(row.pieces) if job.top_logprobs is not None else [],
                                               top_logprobs=list(row.top)))
                continue
            key = suggestion_key(row.text)
            row.kept = bool(key and key not in job.seen_texts and len(job.accepted) < job.n)
            if row.kept:
                job.seen_texts.add(key)
                job.accepted.append(Suggestion(text=row.text, token_ids=list(row.tokens),
                                               logprobs=list(row.logprobs), finish_reason=row.finish))
        return job.n - len(job.accepted)
