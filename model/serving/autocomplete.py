"""Autocomplete rules: from a document to a prompt, and from generated tokens to a suggestion.

- Token healing: the document's last token is backed up and regenerated under the
  constraint that it starts with the characters typed, so "Hel" can become "Hello".
- Long documents are cut from the left at stable boundaries so consecutive keystrokes
  keep the same prompt start and hit the prefix cache.
- Suggestions end at a natural place: a line end, a sentence end, or a word budget.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..contract import CHARS_PER_TOKEN, clean_output, stable_tail
from ..errors import BadRequest
from ..network.tokenizer import GPTTokenizer, complete_utf8_prefix

AUTO_MAX_WORDS = 16
_SENTENCE_END = re.compile(r"\w[^\n]*?[.!?…]+[\"'”’)\]]*(?=\s|$)")


@dataclass
class Prompt:
    tokens: list[int]  # what is prefilled
    heal: bytes  # what the first generated tokens must spell out (the backed-up token's bytes)
    text_prefix: str = ""  # for tokenizers that are not byte-level: the decoded prompt
    dropped_tokens: int = 0  # cut from the left to fit the context


def build_prompt(tokenizer: GPTTokenizer, text: str, budget: int, bos: Optional[int]) -> Prompt:
    """Prompt tokens for `text` that fit in `budget` tokens, with token healing when byte-level."""
    text = stable_tail(text, budget * CHARS_PER_TOKEN)
    ids = tokenizer.encode(text)
    heal = b""
    if tokenizer.byte_level and ids:
        heal = tokenizer.token_bytes(ids[-1])
        ids = ids[:-1]
    dropped = 0
    if len(ids) > budget:
        # Cut whole strides, so the start moves only once every `stride` tokens of typing.
        stride = max(1, budget // 4)
        dropped = -(-(len(ids) - budget) // stride) * stride
        ids = ids[dropped:]
    if not ids:
        if bos is None:
            raise BadRequest("the text is empty and this model has no start-of-text token; type a few words first")
        ids = [bos]
    prefix = "" if tokenizer.byte_level else tokenizer.decode(ids)
    return Prompt(ids, heal, prefix, dropped)


class HealingMasks:
    """Which tokens may come next while the typed characters of a healed token are spelled out.

    Allowed: tokens that start with the pending bytes (a contiguous run of the sorted token
    bytes, found by bisection) and tokens that are a prefix of them (looked up directly).
    """

    def __init__(self, tokenizer: GPTTokenizer, vocab_size: int):
        table = tokenizer.all_token_bytes()
        self.vocab_size = max(vocab_size, len(table))  # a model may pad its vocabulary
        entries = sorted((b, i) for i, b in enumerate(table) if b)
        self.sorted_bytes = [b for b, _ in entries]
        self.sorted_ids = [i for _, i in entries]
        self.by_bytes: dict[bytes, list[int]] = {}
        for b, i in entries:
            self.by_bytes.setdefault(b, []).append(i)
        self.mask = lru_cache(maxsize=512)(self._mask)

    def _mask(self, pending: bytes) -> torch.Tensor:
        start = bisect.bisect_left(self.sorted_bytes, pending)
        end = start
        while end < len(self.sorted_bytes) and self.sorted_bytes[end].startswith(pending):
            end += 1
        idx = self.sorted_ids[start:end]
        for cut in range(1, len(pending)):
            idx += self.by_bytes.get(pending[:cut], [])
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[idx] = True
        return allowed


def continuation(tokenizer: GPTTokenizer, prompt: Prompt, generated: list[int]) -> str:
    """The text the generated tokens add after what the person typed, never ending in half a character.

    A character still being spelled out over several tokens is left out until its last byte
    comes; bytes that can form no character at all (a model may emit any byte) show as U+FFFD,
    as the reference decodes them. No control characters."""
    if tokenizer.byte_level:
        data = tokenizer.decode_bytes(generated)
        data = data[len(prompt.heal):] if data.startswith(prompt.heal) else data
        return clean_output(complete_utf8_prefix(data).decode("utf-8", errors="replace"))
    full = tokenizer.decode(prompt.tokens + generated)
    return full[len(prompt.text_prefix):] if full.startswith(prompt.text_prefix) else full


def settled_text(text: str, stop) -> str:
    """The part of an unfinished suggestion's text that no stop rule can take back (for streaming).

    With a list of stop strings, the end of the text that could begin a stop string is held
    back until the next tokens show whether it does ("... th" under " the"). "auto" never takes
    text back: a line end, a sentence's end or the word budget is acted on in the step it
    appears, so each cut falls at or after the end of the text shown before that step.
    """
    if isinstance(stop, (list, tuple)):
        longest = max((len(s) for s in stop if s), default=0)
        for cut in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[cut:]
            if any(s.startswith(tail) for s in stop if s):
                return text[:cut]
    return text


def apply_stop(text: str, stop) -> tuple[str, bool]:
    """(text cut at the first stop, whether a stop was reached)."""
    if stop is None or text == "":
        return text, False
    if isinstance(stop, (list, tuple)):
        cuts = [text.find(s) for s in stop if s and s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)
    # "auto": the end of the line, of the sentence, or a word budget
    newline = text.find("\n")
    while newline != -1 and not text[:newline].strip():
        newline = text.find("\n", newline + 1)
    if newline != -1:
        return text[:newline], True
    m = _SENTENCE_END.search(text)
    if m:
        return text[: m.end()], True
    words = list(re.finditer(r"\S+", text))
    if len(words) >= AUTO_MAX_WORDS:
        return text[: words[AUTO_MAX_WORDS - 1].end()], True
    return text, False
