"""Request and result types shared by the engine, the queue and the app.

Plain dataclasses, defined once, that cross the Celery queue as JSON
(`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

StopSetting = Union[str, list, None]  # "auto", None, or a list of strings


class _JSON:
    """Mixin: to/from plain dicts, recursing into nested dataclasses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        kwargs = {}
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in data.items():
            if name not in hints:
                continue
            nested = _NESTED.get((cls.__name__, name))
            if nested is not None and value is not None:
                if isinstance(value, list):
                    value = [nested.from_dict(v) for v in value]
                else:
                    value = nested.from_dict(value)
            kwargs[name] = value
        return cls(**kwargs)


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
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str = "length"  # length | stop | eos | time | cancelled


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


@dataclass
class Completion(_JSON):
    model: str
    suggestions: list
    timings: Timings = field(default_factory=Timings)
    healed: str = ""  # characters of the text that suggestions were constrained to start with


@dataclass
class ClassifyRequest(_JSON):
    text: str
    model: str = ""
    labels: Optional[list] = None


@dataclass
class LabelScore(_JSON):
    label: str
    score: float


@dataclass
class Classification(_JSON):
    model: str
    labels: list
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


@dataclass
class TokenScore(_JSON):
    """One token of a scored text. rank 1 is the model's first choice; rank 0 marks a first
    token that could not be scored (a model with no start-of-text token)."""

    text: str
    token_id: int
    prob: float
    rank: int


@dataclass
class Scores(_JSON):
    model: str
    tokens: list
    timings: Timings = field(default_factory=Timings)


_NESTED: dict[tuple[str, str], Any] = {
    ("Completion", "suggestions"): Suggestion,
    ("Completion", "timings"): Timings,
    ("Classification", "labels"): LabelScore,
    ("Classification", "timings"): Timings,
    ("Answer", "timings"): Timings,
    ("Scores", "tokens"): TokenScore,
    ("Scores", "timings"): Timings,
}

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
