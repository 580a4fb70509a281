"""Request and result types shared by the engine, the queue and the app.

Plain dataclasses, defined once, that cross the Celery queue as JSON
(`to_dict` / `from_dict`); nested results are typed by their annotations.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

StopSetting = Union[str, list, None]  # "auto", None, or a list of strings


class _JSON:
    """Mixin: to and from plain JSON-able dicts. Nested types come from the field annotations."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} must come as a JSON object")
        hints = _hints(cls)
        return cls(**{name: _decode(hints[name], value) for name, value in data.items() if name in hints})


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: tp for name, tp in typing.get_type_hints(cls).items() if name in names}


def _decode(tp, value):
    """`value` (plain JSON) as type `tp`: dataclasses and lists of them are rebuilt."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return [_decode(item, v) for v in value]
    if isinstance(tp, type) and issubclass(tp, _JSON) and isinstance(value, dict):
        return tp.from_dict(value)
    return value


@dataclass
class CompletionRequest(_JSON):
    text: str
    model: str = ""
    n: int = 3
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: Optional[int] = None
    max_time: Optional[float] = None
    stop: StopSetting = "auto"
    fresh: bool = False  # ask for new samples: bypass the suggestion cache
    # Raw mode (the OpenAI-compatible API): exactly n rows in order, the prompt as sent (no token
    # healing, no cut from the left), no automatic stop, no dropped empty or duplicate texts.
    raw: bool = False
    presence_penalty: float = 0.0   # OpenAI's: minus this from a token's logit once it has been generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often it has been generated
    logprobs: Optional[int] = None  # per token: its text and log-probability, and this many alternatives

    def settings_key(self) -> dict:
        """Every field that changes the answer, except the text itself."""
        d = self.to_dict()
        d.pop("text")
        d.pop("fresh")
        d.pop("max_time")
        return d


@dataclass
class Suggestion(_JSON):
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # length | stop | eos | time | cancelled
    # With a request's `logprobs` (raw mode): each token's share of the text (they join into it)
    # and its likeliest alternatives, [[token text, log-probability], ...]
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[list] = field(default_factory=list)


@dataclass
class Timings(_JSON):
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    tokens_prefilled: int = 0
    tokens_reused: int = 0
    tokens_decoded: int = 0
    source: str = "engine"  # engine | cache | cache-incremental
    worker: str = ""  # the Celery worker that answered, in the distributed mode

    def summary(self, model: str) -> str:
        """'gpt2 · 84 ms · 12 tokens decoded · 5 prefilled, 40 reused' — the line every answer carries,
        formatted here only (the page shows the server's line as it is)."""
        parts = [model, f"{self.total_ms:.0f} ms"]
        if self.tokens_decoded:
            parts.append(f"{self.tokens_decoded} tokens decoded")
        if self.tokens_prefilled or self.tokens_reused:
            parts.append(f"{self.tokens_prefilled} prefilled, {self.tokens_reused} reused")
        if self.source and self.source != "engine":
            parts.append(f"from {self.source}")
        return " · ".join(parts)


@dataclass
class Completion(_JSON):
    model: str
    suggestions: list[Suggestion]
    timings: Timings = field(default_factory=Timings)
    healed: str = ""  # characters of the text that suggestions were constrained to start with
    prompt_tokens: int = 0  # tokens of the prompt the suggestions follow


@dataclass
class PartialSuggestion(_JSON):
    """One suggestion while it is being written (streaming; see model/streaming.py for what it promises)."""

    index: int  # the row's seed offset: suggestion i samples with seed + i; replacements get new indices
    text: str
    finished: bool = False
    finish_reason: Optional[str] = None
    # With a request's `logprobs`: the tokens so far, as Suggestion has them (the text may hold back
    # the end of the last ones while a stop string could still begin there)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[list] = field(default_factory=list)


@dataclass
class CompletionUpdate(_JSON):
    """What a streamed completion reports: the suggestions so far, and on the last update the answer."""

    suggestions: list[PartialSuggestion]
    completion: Optional[Completion] = None  # set on the last update only: the authoritative result


@dataclass
class ClassifyRequest(_JSON):
    text: str
    model: str = ""
    labels: Optional[list[str]] = None


@dataclass
class LabelScore(_JSON):
    label: str
    score: float


@dataclass
class Classification(_JSON):
    model: str
    labels: list[LabelScore]
    method: str = "head"  # head | zero-shot
    timings: Timings = field(default_factory=Timings)


@dataclass
class AnswerRequest(_JSON):
    question: str
    context: str
    model: str = ""


@dataclass
class Answer(_JSON):
    model: str
    text: str
    score: float
    start: Optional[int] = None  # character offsets into the context; None when generated
    end: Optional[int] = None
    generated: bool = False
    timings: Timings = field(default_factory=Timings)


@dataclass
class ScoreRequest(_JSON):
    text: str
    model: str = ""
    top_logprobs: int = 0  # also each token's likeliest alternatives, this many (at most 5)


@dataclass
class TokenScore(_JSON):
    """One token of a scored text. rank 1 is the model's first choice; rank 0 marks a first
    token that could not be scored (a model with no start-of-text token)."""

    text: str
    token_id: int
    prob: float
    rank: int
    logprob: Optional[float] = None  # None for a first token that could not be scored
    top_logprobs: list[list] = field(default_factory=list)  # [[token text, log-probability], ...] when asked


@dataclass
class Scores(_JSON):
    model: str
    tokens: list[TokenScore]
    timings: Timings = field(default_factory=Timings)


REQUEST_TYPES = {
    "complete": CompletionRequest,
    "classify": ClassifyRequest,
    "answer": AnswerRequest,
    "score": ScoreRequest,
}
RESULT_TYPES = {
    "complete": Completion,
    "classify": Classification,
    "answer": Answer,
    "score": Scores,
}
