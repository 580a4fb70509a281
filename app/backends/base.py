"""The interface the UI and the CLI talk to, whether the engine runs here or behind a queue."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from model.errors import UnknownModel
from model.types import (Answer, AnswerRequest, Classification, ClassifyRequest, Completion, CompletionRequest,
                         ScoreRequest, Scores)


class Backend(ABC):
    """complete / classify / answer / score, plus shared documents.

    Every method either returns a result or raises a `model.errors.WWTError` with a message
    a person can read; nothing else escapes.
    """

    kind = "abstract"

    @abstractmethod
    def models(self) -> list[str]:
        """Names of the models this backend offers, the default first."""

    def default_model(self) -> str:
        """The model a request without one goes to: the first offered (settings.model_specs' order)."""
        offered = self.models()
        if not offered:
            raise UnknownModel("no model is available")
        return offered[0]

    @abstractmethod
    def model_info(self, name: str) -> dict:
        """What is known about a model without running it (parameters, loaded, device...)."""

    @abstractmethod
    def complete(self, request: CompletionRequest, timeout: Optional[float] = None,
                 supersede: Optional[str] = None) -> Completion:
        """Suggestions for `request`. With `supersede` (say, one editor's id), a newer request with
        the same key cancels this one if it is still running: its answer would be stale."""

    @abstractmethod
    def classify(self, request: ClassifyRequest, timeout: Optional[float] = None) -> Classification: ...

    @abstractmethod
    def answer(self, request: AnswerRequest, timeout: Optional[float] = None) -> Answer: ...

    @abstractmethod
    def score(self, request: ScoreRequest, timeout: Optional[float] = None) -> Scores: ...

    @abstractmethod
    def save_document(self, text: str) -> str:
        """Store a document; returns an unguessable id for a share link."""

    @abstractmethod
    def load_document(self, doc_id: str) -> str: ...

    def close(self) -> None:
        """Release what the backend holds (engines, connections)."""
