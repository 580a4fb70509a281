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
from .sampling import apply_repetition_penalty, sample_rows


class RowPolicy:
    def __init__(self, tokenizer: GPTTokenizer, vocab_size: int, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length  # a row stops before its slot's last usable position
        self.healing = HealingMasks(tokenizer, vocab_size) if tokenizer.byte_level else None

    def take(self, rows: list[tuple[Job, Row]], logits: torch.Tensor) -> None:
        """Choose each row's next token from its logits [B, V] (one sampling pass for the batch)."""
        adjust = any(job.settings.repetition_penalty != 1.0 or row.pending or not row.tokens for job, row in rows)
        scores = logits.clone() if adjust else logits
        for b, (job, row) in enumerate(rows):
            if not adjust:
                break
            if job.settings.repetition_penalty != 1.0:
                seen = torch.tensor(job.prompt.tokens + row.tokens, dtype=torch.long)
                scores[b] = apply_repetition_penalty(scores[b], seen, job.settings.repetition_penalty)
            if row.pending and self.healing is not None:
                scores[b] = scores[b].masked_fill(~self.healing.mask(row.pending), float("-inf"))
            if not row.tokens and job.stop == "auto" and job.eos is not None:
                scores[b, job.eos] = float("-inf")  # a suggestion is never empty
        tokens = sample_rows(scores, [job.settings for job, _ in rows], [row.generator for _, row in rows],
                             [row.index if not row.tokens else 0 for _, row in rows])
        chosen = logits[torch.arange(len(rows)), torch.tensor(tokens)]
        logprobs = (chosen - torch.logsumexp(logits, -1)).tolist()  # log-softmax of the chosen tokens only
        for (job, row), token, logprob in zip(rows, tokens, logprobs):
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
            self.end(job, row, "eos")
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
        if reason in ("eos", "time", "cancelled", "length") and not row.pending:
            row.text = apply_stop(self._text(job, row), job.stop)[0]

    def _text(self, job: Job, row: Row) -> str:
        return clean_output(continuation(self.tokenizer, job.prompt, row.tokens))

    @staticmethod
    def collect(job: Job) -> int:
        """Keep the finished rows' distinct, non-empty suggestions; how many are still missing."""
        for row in sorted(job.rows, key=lambda r: r.index):
            if row.kept is not None or row.finish is None:
                continue
            key = suggestion_key(row.text)
            row.kept = bool(key and key not in job.seen_texts and len(job.accepted) < job.n)
            if row.kept:
                job.seen_texts.add(key)
                job.accepted.append(Suggestion(text=row.text, token_ids=list(row.tokens),
                                               logprobs=list(row.logprobs), finish_reason=row.finish))
        return job.n - len(job.accepted)
