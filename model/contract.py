"""The request contract: the limits of every setting, how text is cleaned, and the prompt window.

Defined once, here, and read by the UI's sliders, the HTTP API, the CLI, the workers and the
engine. Imports no torch, so the app can check a request before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional

from .errors import BadRequest
from .types import CompletionRequest

# Longest text (document, passage, question) a request may carry, in characters as a browser counts
# them (UTF-16 code units: an emoji is two). Escaped in JSON a code unit takes at most 6 bytes
# (\uXXXX), so the HTTP body limit (WWT_MAX_BODY_MB, 7 MB) carries any text this allows.
MAX_TEXT_CHARS = 1_000_000
MAX_LABELS = 32  # zero-shot candidate labels
# The editor sends at most this much of the text before the cursor, cut by `stable_tail`:
# far more than any model's window (1024 tokens), far less than a whole book.
SEND_CHARS = 65536
MAX_STOPS = 16  # stop strings of one request
CHARS_PER_TOKEN = 12  # a prompt of N tokens never needs more than 12 N characters of text

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tabs and line ends stay


@dataclass(frozen=True)
class Limit:
    low: float
    high: float
    kind: type  # int or float
    default: Optional[float]
    meaning: str


# The settings of a completion request. The engine narrows n and max_new_tokens further by
# what the loaded model can hold (its KV-cache slots, half its context).
LIMITS = {
    "n": Limit(1, 10, int, 3, "suggestions per request"),
    "max_new_tokens": Limit(1, 256, int, 8, "tokens per suggestion, at most"),
    "temperature": Limit(0.0, 5.0, float, 1.0, "sampling temperature; 0 picks the likeliest tokens (greedy)"),
    "top_k": Limit(0, 1000, int, 0, "sample among the k likeliest tokens; 0: no limit"),
    "top_p": Limit(0.05, 1.0, float, 0.9, "sample within this much probability mass"),
    "repetition_penalty": Limit(0.1, 10.0, float, 1.0, "above 1: tokens already in the text are less likely"),
    "seed": Limit(0, 2 ** 62, int, None, "suggestion i samples with seed + i; empty: random"),
    "max_time": Limit(0.01, 3600.0, float, None, "seconds the engine may spend; empty: no limit"),
    "presence_penalty": Limit(-2.0, 2.0, float, 0.0, "OpenAI's: subtracted from a token's logit once it was generated"),
    "frequency_penalty": Limit(-2.0, 2.0, float, 0.0, "OpenAI's: subtracted per time a token was generated"),
    "logprobs": Limit(0, 5, int, None, "per token: its log-probability and this many alternatives; empty: none"),
}
DEFAULTS = {name: limit.default for name, limit in LIMITS.items()}


def check_setting(name: str, value, high: Optional[float] = None):
    """`value` as the setting's type, or its default for None; BadRequest when out of range.

    Booleans and strings are refused: "3" or true are not numbers. `high` narrows the limit
    (the engine's own bounds for the loaded model).
    """
    limit = LIMITS[name]
    if value is None or value == "":
        return limit.default
    top = limit.high if high is None else min(high, limit.high)
    kind_word = "a whole number" if limit.kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and (
            math.isnan(value) or math.isinf(value))) or not (limit.low <= value <= top) \
            or (limit.kind is int and value != int(value)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise BadRequest(f"{name} must be {kind_word} between {limit.low:g} and {top:g} (got {shown})")
    return limit.kind(value)


def clean_text(text, what: str = "text", required: bool = False) -> str:
    """Text any tokenizer accepts: no control characters (tabs and line ends stay), lone
    surrogates as U+FFFD, within MAX_TEXT_CHARS; BadRequest otherwise (or when `required` and empty)."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise BadRequest(f"the {what} must be text")
    if len(text) > MAX_TEXT_CHARS or utf16_length(text) > MAX_TEXT_CHARS:
        raise BadRequest(f"the {what} has {utf16_length(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
    text = _CONTROL.sub("", text)
    if _has_surrogates(text):
        # Pairs split into two code units (as JavaScript sends them) join; lone halves become U+FFFD.
        text = text.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")
    if required and not text.strip():
        raise BadRequest(f"the {what} is empty")
    return text


def utf16_length(text: str) -> int:
    """The text's length as a browser counts it: characters outside the BMP (emoji) count twice."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le", errors="surrogatepass")) // 2


def clean_output(text: str) -> str:
    """Generated text as it may be shown or inserted: no control characters."""
    return _CONTROL.sub("", text)


def suggestion_key(text: str) -> str:
    """What makes two suggestions the same (and an empty one empty): the text without the
    spaces around it. The engine keeps one suggestion per key and none with an empty key;
    the suggestion cache applies the same rule to what is left after typing along."""
    return text.strip()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def stable_tail(text: str, max_chars: int) -> str:
    """The end of a long text, cut at a boundary that stays put while the person types.

    Used by the engine for the prompt window and, with SEND_CHARS, by the editor (editor.js
    applies the same rule before sending), so consecutive keystrokes keep the same prompt start
    and keep hitting the prefix cache.
    """
    if len(text) <= max_chars:
        return text
    step = max_chars // 2
    start = ((len(text) - max_chars) // step + 1) * step
    space = text.find(" ", start)
    return text[space if 0 <= space < start + 64 else start:]


@dataclass
class CheckedCompletion(CompletionRequest):
    """A completion request that has passed `check_completion`: only that function makes one, so
    holding one is the proof (no hidden mark). It crosses the queue as a plain request, and the
    worker, on the far side of that boundary, checks it again."""


def check_completion(request: CompletionRequest, max_n: Optional[int] = None,
                     max_new_tokens: Optional[int] = None) -> CheckedCompletion:
    """The request with every setting checked and typed, and its text cleaned; BadRequest otherwise.

    Temperature 0 means greedy. `max_n` / `max_new_tokens` narrow the limits for a loaded model.
    """
    if not isinstance(request, CompletionRequest):
        raise BadRequest("not a completion request")
    values = {name: check_setting(name, getattr(request, name),
                                  {"n": max_n, "max_new_tokens": max_new_tokens}.get(name))
              for name in LIMITS}
    greedy = bool(request.greedy) or values["temperature"] == 0
    if greedy:
        values["temperature"] = 1.0
    stop = request.stop
    raw = request.raw is True
    if raw and stop == "auto":
        raise BadRequest("stop must be null or a list of strings in raw mode (no automatic stops)")
    if not (stop is None or stop == "auto" or (isinstance(stop, (list, tuple)) and len(stop) <= MAX_STOPS
                                                and all(isinstance(s, str) and len(s) <= 256 for s in stop))):
        raise BadRequest(f'stop must be "auto", null, or a list of at most {MAX_STOPS} strings of at most 256 characters')
    model = request.model if isinstance(request.model, str) else ""
    fields = {**dataclasses.asdict(request), **values}
    fields.update(text=clean_text(request.text), model=model, greedy=greedy,
                  stop=list(stop) if isinstance(stop, tuple) else stop, fresh=bool(request.fresh) or raw, raw=raw)
    return CheckedCompletion(**fields)


def narrowed(request: CompletionRequest, max_n: int, max_new_tokens: int) -> CheckedCompletion:
    """The request checked (unless it is a CheckedCompletion already), then narrowed to what one
    loaded model can hold (`max_n` slots, `max_new_tokens`)."""
    if not isinstance(request, CheckedCompletion):
        return check_completion(request, max_n, max_new_tokens)
    for name, value, high in (("n", request.n, max_n), ("max_new_tokens", request.max_new_tokens, max_new_tokens)):
        if value > high:
            raise BadRequest(f"{name} must be a whole number between {LIMITS[name].low:g} and {high:g} "
                             f"for this model (got {value})")
    return request
