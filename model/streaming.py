"""The streaming contract: what a partial suggestion promises, and the events that carry it.

A streamed completion reports its suggestions as they are decoded, then its answer. The
promise a reader can build a display on:

- A partial text only ever grows: each one starts with the text shown before for the same
  index. The engine holds back the end of a text that could begin a stop string (the
  "auto" rule never takes text back), and `GrowOnly` keeps the text shown instead of any
  that would shrink it (say, from a task redelivered to another worker after a crash).
- Only whole characters: the engine decodes whole UTF-8 characters only.
- The final answer (`done`) is authoritative. It holds the distinct, non-empty suggestions
  the non-streaming call returns for the same request and seed; a partial row can be missing
  from it (a duplicate or empty text is dropped and a replacement row with a new index may be
  written) and, rarely, its text can be shorter than the last partial (a stop rule cut it).

Events, as plain JSON-able dicts (Backend.stream_complete, the worker's Redis channel and
the HTTP endpoint all use them):
    {"type": "partial", "suggestions": [{"index", "text", "finished", "finish_reason"}, ...]}
    {"type": "done", "result": Completion.to_dict()}
    {"type": "error", "error": "a readable message", "kind": "bad_request" | "timeout" | ...}

Standard library only, so the app and the workers use it without torch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .errors import WWTError
from .types import Completion, PartialSuggestion


class GrowOnly:
    """Pass a snapshot's texts on only where they extend what was passed on before."""

    def __init__(self):
        self._shown: dict[int, str] = {}

    def apply(self, suggestions: Iterable[PartialSuggestion]) -> list[PartialSuggestion]:
        out = []
        for s in suggestions:
            before = self._shown.get(s.index)
            if before is not None and not s.text.startswith(before):
                s = dataclasses.replace(s, text=before)
            self._shown[s.index] = s.text
            out.append(s)
        return out


def partial_event(suggestions: Iterable[PartialSuggestion]) -> dict:
    return {"type": "partial", "suggestions": [s.to_dict() for s in suggestions]}


def done_event(completion: Completion) -> dict:
    return {"type": "done", "result": completion.to_dict()}


def error_event(error: WWTError) -> dict:
    return {"type": "error", "error": error.message, "kind": error.kind}


def partials_of(event: dict) -> list[PartialSuggestion]:
    """The suggestions of a partial event that came as JSON (from Redis or HTTP)."""
    return [PartialSuggestion.from_dict(s) for s in event.get("suggestions") or [] if isinstance(s, dict)]
