"""What each button and key of the page does, as plain functions of a Backend.

They take and return plain values (strings, dicts, lists), never Gradio objects, so the
tests call them directly. A failure never escapes as a traceback: it comes back as a
message (and is passed to `warn`, which the page turns into a toast).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from app.backends.base import Backend
from model import contract
from model.errors import BadRequest, UnknownModel, WWTError, caller_error
from model.types import AnswerRequest, ClassifyRequest, Completion, CompletionRequest, ScoreRequest

from . import ops, render

log = logging.getLogger(__name__)

# The settings the page offers, with the contract's limits and defaults (model/contract.py).
PAGE_SETTINGS = ("n", "max_new_tokens", "temperature", "top_k", "top_p")
DEFAULTS = {name: contract.DEFAULTS[name] for name in PAGE_SETTINGS}

Warn = Optional[Callable[[str], None]]


def friendly(call: Callable, warn: Warn = None):
    """(result, None) or (None, message): what the visitor is told (model.errors.caller_error)."""
    try:
        return call(), None
    except Exception as e:
        message = caller_error(e, log, "callback").message
    if warn is not None:
        warn(message)
    return None, message


# -- input checks --------------------------------------------------------------------------

def clean(text, what: str = "text", required: bool = False) -> str:
    return contract.clean_text(text, what, required)


MAX_SHOWN = 60  # characters of a caller's value repeated in a message
MAX_COMPARE_NAMES = 10_000  # names a Compare call may list (duplicates included) before it is refused


def quoted(value, limit: int = MAX_SHOWN) -> str:
    """repr(value), cut to `limit` characters: a message never echoes a caller's 10 MB back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def check_model(backend: Backend, name: Optional[str]) -> str:
    if not name:
        return backend.default_model()
    offered = backend.models()
    if not isinstance(name, str) or name not in offered:
        raise UnknownModel(f"unknown model {quoted(name)}; this app offers {', '.join(offered) or 'none'}")
    return name


def completion_request(backend: Backend, text: str, model: Optional[str], fresh: bool = False,
                       seed: Optional[int] = None, **given) -> contract.CheckedCompletion:
    """The page's request, checked against the contract (temperature 0 means greedy)."""
    values = {name: contract.check_setting(name, given.get(name)) for name in PAGE_SETTINGS}
    request = CompletionRequest(text=text, model=check_model(backend, model), seed=seed, fresh=bool(fresh),
                                stop="auto", **values)
    return contract.check_completion(request)


def check_seed(seed) -> Optional[int]:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BadRequest(f"seed must be a whole number of at least 0 (got {quoted(seed)})")
    return seed


def page_request(backend: Backend, data) -> tuple[contract.CheckedCompletion, Optional[str]]:
    """The editor's body ({"before", "model", the page's settings, "fresh", "seed", "client"}), as
    the streaming route and the Tab's fallback call both read it: (the checked request, the
    supersede key: the editor's id, whose newer request cancels its older one)."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    request = completion_request(backend, data.get("before", ""), data.get("model"), fresh=data.get("fresh", False),
                                 seed=check_seed(data.get("seed")), **{name: data.get(name) for name in PAGE_SETTINGS})
    editor = data.get("client")
    return request, editor if isinstance(editor, str) and editor else None


def parse_labels(labels) -> Optional[list]:
    """'sports, politics' or a list -> ['sports', 'politics']; empty -> None (the model's own head)."""
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = labels.split(",")
    elif not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise BadRequest(f"labels must be text (comma-separated) or a list of texts (got {quoted(labels)})")
    if len(labels) > 10 * contract.MAX_LABELS:  # before cleaning a million of them
        raise BadRequest(f"at most {contract.MAX_LABELS} candidate labels (got {len(labels):,})")
    out = [clean(label, "label").strip() for label in labels]
    out = [label for label in out if label]
    return out or None


# -- the Write tab ---------------------------------------------------------------------------

def suggest(backend: Backend, data: dict, client: Optional[str] = None) -> dict:
    """The editor's Tab: continuations of the text before the cursor, as JSON for the page.
    `client`: the caller's address (per-client waiting bound); a refusal such as "busy: ...;
    try again in a moment" comes back as {"ok": False, "error": message} for the error line."""
    data = data if isinstance(data, dict) else {}

    def run():
        with ops.observe("suggest", backend, data.get("model")):
            request, supersede = page_request(backend, data)
            return request, backend.complete(request, client=client if client is not None else supersede,
                                             supersede=supersede)

    done, error = friendly(run)
    if error:
        return {"ok": False, "error": error}
    request, result = done
    return page_answer(result, asked=request.n)


def page_answer(completion: Completion, asked: int) -> dict:
    """The one shape the editor reads an answer in, from the Tab's call and the stream's done event
    alike: {"ok": True, "model", "ms", "suggestions": [{"text", "finish"}], "info": the timing line
    (Timings.summary), "asked"}, or {"ok": False, "error"} when nothing is left to suggest."""
    items = [{"text": s.text, "finish": s.finish_reason} for s in completion.suggestions if s.text]
    if not items:
        return {"ok": False, "error": f"{completion.model} had nothing to suggest here; try again or change the settings"}
    return {"ok": True, "model": completion.model, "ms": round(completion.timings.total_ms, 1), "suggestions": items,
            "info": completion.timings.summary(completion.model),
            "asked": asked}  # fewer came back when duplicates were dropped: the page says so


def open_shared(backend: Backend, doc_id: Optional[str], warn: Warn = None) -> Optional[str]:
    """The text behind a ?doc= link, or None (with a warning) when there is none."""
    if not doc_id:
        return None
    text, _ = friendly(lambda: backend.load_document(doc_id), warn)
    return text


def token_view(backend: Backend, text: str, model: Optional[str], warn: Warn = None,
               client: Optional[str] = None) -> str:
    """The document coloured by how likely the model found each token."""
    def run():
        req = ScoreRequest(text=clean(text, "document", required=True), model=check_model(backend, model))
        return backend.score(req, client=client)

    scores, error = friendly(run, warn)
    if error:
        return render.error_html(error)
    mean = sum(t.prob for t in scores.tokens) / max(1, len(scores.tokens))
    return (render.info_html(scores.model, scores.timings, f"{len(scores.tokens)} tokens, mean p = {mean:.2f}")
            + render.token_view_html(scores))


def model_status(backend: Backend, model: Optional[str]) -> str:
    """'gpt2 · 124M parameters · loaded on cpu' for the settings panel, with the operator's
    warning under it when the backend's Redis has no password (Backend.security_warning)."""
    warning = backend.security_warning(for_operator=False)
    return _model_state(backend, model) + (render.warning_html(warning) if warning else "")


def _model_state(backend: Backend, model: Optional[str]) -> str:
    info, error = friendly(lambda: backend.model_info(check_model(backend, model)))
    if error:
        return render.error_html(error)
    parts = [info.get("name", model or "")]
    if info.get("parameters"):
        parts.append(f"{render.human_count(info['parameters'])} parameters")
    if info.get("precision"):
        weights = f", {render.human_bytes(info['weight_bytes'])} of weights" if info.get("weight_bytes") else ""
        parts.append(f"{info['precision']}{weights}")
    if "loaded" in info:
        parts.append(f"loaded on {info.get('device', '?')}" if info["loaded"] else "loads on first use")
    if "served" in info:
        parts.append(f"{len(info.get('workers') or [])} worker(s)" if info["served"] else "no worker serving it")
    ready = bool(info.get("loaded") or info.get("served"))
    return render.status_html(" · ".join(str(p) for p in parts), ready)


def load_model(backend: Backend, model: Optional[str], warn: Warn = None) -> str:
    """Load a model now (embedded mode), so its download and loading happen under a progress bar."""
    _, error = friendly(lambda: backend.prepare(check_model(backend, model)), warn)
    if error:
        return render.error_html(error)
    return model_status(backend, model)


# -- the other tabs --------------------------------------------------------------------------

def classify(backend: Backend, text: str, labels, model: Optional[str], warn: Warn = None,
             client: Optional[str] = None):
    """-> ({label: probability} or None, info html)."""
    def run():
        req = ClassifyRequest(text=clean(text, required=True), model=check_model(backend, model),
                              labels=parse_labels(labels))
        return backend.classify(req, client=client)

    result, error = friendly(run, warn)
    if error:
        return None, render.error_html(error)
    method = "zero-shot from the language model" if result.method == "zero-shot" else "classification head"
    return {s.label: float(s.score) for s in result.labels}, render.info_html(result.model, result.timings, method)


def answer(backend: Backend, context: str, question: str, model: Optional[str], warn: Warn = None,
           client: Optional[str] = None):
    """-> (the passage as flowing HTML with the answer marked, answer text, info html)."""
    def run():
        req = AnswerRequest(question=clean(question, "question", required=True),
                            context=clean(context, "context", required=True), model=check_model(backend, model))
        return req.context, backend.answer(req, client=client)

    result, error = friendly(run, warn)
    if error:
        return None, "", render.error_html(error)
    context, ans = result
    if ans.generated:
        extra = f"generated by the language model (not a span of the passage) · score {ans.score:.2f}"
        shown = f"{ans.text}  [generated]"
    else:
        extra = f"extracted from the passage · score {ans.score:.2f}"
        shown = ans.text
    return render.answer_html(context, ans), shown, render.info_html(ans.model, ans.timings, extra)


def prompt_tail(prompt: str, words: int = 6) -> str:
    """The last few words of a prompt, to show what each suggestion continues."""
    parts = prompt.split(" ")
    return prompt if len(parts) <= words else "…" + " ".join(parts[-words:])


def compare_rows(backend: Backend, prompt: str, models, max_new_tokens=16, n=2,
                 client: Optional[str] = None) -> list[dict]:
    """One prompt to several models at once: a row per model (suggestions, speed, size, how likely
    it found the prompt), or WWTError for bad input or a client past its bound.

    The list is deduplicated and holds offered models only (so at most one request per offered
    model), and the whole Compare holds one place of its client's bound (Backend.one_place), in
    both modes: one call cannot fill the waiting list."""
    prompt = clean(prompt, "prompt", required=True)
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if not isinstance(models, (list, tuple)) or len(models) > MAX_COMPARE_NAMES \
            or not all(isinstance(m, str) for m in models):
        raise BadRequest(f"choose the models to compare from the {len(backend.models())} offered")
    models = [check_model(backend, m) for m in dict.fromkeys(models)]
    if not models:
        raise BadRequest("choose at least one model to compare")
    length = contract.check_setting("max_new_tokens", max_new_tokens)
    n = contract.check_setting("n", n)

    def one(name: str) -> dict:
        req = CompletionRequest(text=prompt, model=name, n=n, max_new_tokens=length, seed=0, stop="auto")
        started = time.perf_counter()
        result, error = friendly(lambda: backend.complete(req))
        if error:
            return {"model": name, "error": error}
        t = result.timings
        ms = t.total_ms or (time.perf_counter() - started) * 1000
        decode_s = (t.decode_ms or ms) / 1000
        info, _ = friendly(lambda: backend.model_info(name))
        scores, score_error = friendly(lambda: backend.score(ScoreRequest(text=prompt, model=name)))
        return {"model": result.model, "ms": ms, "tokens_per_s": t.tokens_decoded / decode_s if decode_s else 0.0,
                "parameters": (info or {}).get("parameters"), "precision": (info or {}).get("precision"),
                "weight_bytes": (info or {}).get("weight_bytes"), "prompt_tail": prompt_tail(prompt),
                "suggestions": [s.text for s in result.suggestions],
                **(likelihood(scores) if scores is not None else {"score_error": score_error})}

    with backend.one_place(client, "Compare"), ThreadPoolExecutor(max_workers=len(models)) as pool:
        return list(pool.map(one, models))


def compare(backend: Backend, prompt: str, models, max_new_tokens=16, n=2, warn: Warn = None,
            client: Optional[str] = None) -> str:
    """The Compare tab: compare_rows as a chart and cards."""
    rows, error = friendly(lambda: compare_rows(backend, prompt, models, max_new_tokens, n, client), warn)
    if error:
        return render.error_html(error)
    return render.compare_chart_html(rows) + render.compare_html(rows)


def likelihood(scores) -> dict:
    """How likely a model found a text: the mean log-probability per predicted token and its perplexity.

    A first token that nothing predicts (rank 0) is left out; no predicted token -> {}.
    """
    logs = [math.log(max(t.prob, 1e-30)) for t in scores.tokens if t.rank]
    if not logs:
        return {}
    mean = sum(logs) / len(logs)
    return {"mean_logprob": mean, "perplexity": math.exp(-mean), "scored_tokens": len(logs)}


# -- the named API endpoints (errors are raised; the page layer turns them into gr.Error) ---

def api_complete(backend: Backend, text: str, model: str = "", n: int = 3, max_new_tokens: int = 8,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 0.9, fresh: bool = False,
                 seed: Optional[int] = None, client: Optional[str] = None) -> dict:
    with ops.observe("complete", backend, model):
        req = completion_request(backend, text, model, fresh=fresh, seed=check_seed(seed), n=n, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
        return backend.complete(req, client=client).to_dict()


def api_classify(backend: Backend, text: str, labels="", model: str = "", client: Optional[str] = None) -> dict:
    with ops.observe("classify", backend, model):
        req = ClassifyRequest(text=clean(text, required=True), model=check_model(backend, model),
                              labels=parse_labels(labels))
        return backend.classify(req, client=client).to_dict()


def api_answer(backend: Backend, question: str, context: str, model: str = "", client: Optional[str] = None) -> dict:
    with ops.observe("answer", backend, model):
        req = AnswerRequest(question=clean(question, "question", required=True),
                            context=clean(context, "context", required=True), model=check_model(backend, model))
        return backend.answer(req, client=client).to_dict()


def api_compare(backend: Backend, text: str, models="", max_new_tokens: int = 16, n: int = 2,
                client: Optional[str] = None) -> dict:
    """The Compare tab as a named endpoint: {"prompt", "rows": [one per model]}; `models` is a list
    or comma-separated (empty: every offered model)."""
    with ops.observe("compare", backend, None):
        chosen = models if models else backend.models()
        return {"prompt": text, "rows": compare_rows(backend, text, chosen, max_new_tokens, n, client)}


def api_score(backend: Backend, text: str, model: str = "", client: Optional[str] = None) -> dict:
    with ops.observe("score", backend, model):
        req = ScoreRequest(text=clean(text, required=True), model=check_model(backend, model))
        return backend.score(req, client=client).to_dict()
