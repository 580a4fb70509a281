"""The OpenAI-compatible completions API: `GET /v1/models`, `POST /v1/completions`.

Clients written for OpenAI, vLLM, TGI or the llama.cpp server (the `openai` package, `curl`,
editor plug-ins that take "an OpenAI-compatible completions endpoint") work against this app.
It has OpenAI's semantics, not the editor's: a completion is the raw mode of the backend's one
primitive (`CompletionRequest.raw`: exactly `n` choices in order, the prompt as sent with no
token healing, no automatic stop, nothing taken from the suggestion cache), with OpenAI's
defaults. What the models cannot honour (`suffix`, `best_of` above `n`, token-array prompts,
`logit_bias`) is refused by name. Errors come in OpenAI's shape with the status a client
expects. docs/api.md is the reference; the same client identity and bounds as every path apply.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import queue as queue_module
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from model.contract import LIMITS, MAX_STOPS
from model.errors import (BackendUnavailable, BadRequest, Busy, Forbidden, LimitReached, NoWorker, NotFound,
                          RequestTimeout, UnknownModel, WWTError, caller_error)
from app.backends.base import answer_of
from model.streaming import partials_of
from model.types import Completion, CompletionRequest, ScoreRequest

from . import ops

log = logging.getLogger(__name__)

PREFIX = "/v1"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
BUSY_RETRY_S = 1  # Retry-After on a 429 for a busy model or client
PARAMETERS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
              "frequency_penalty", "logprobs", "echo", "user", "stream", "stream_options", "suffix", "best_of",
              "logit_bias"}
MAX_USER_CHARS = 256


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error", retry_after: Optional[float] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(error: WWTError) -> APIError:
    """Our error as the status and shape an OpenAI client expects (docs/api.md lists them)."""
    message = openai_words(error.message)
    if isinstance(error, UnknownModel):
        return APIError(404, message, "model", "model_not_found")
    if isinstance(error, Busy):
        return APIError(429, message, None, "busy", "rate_limit_error", BUSY_RETRY_S)
    if isinstance(error, LimitReached):
        status = 413 if error.limit in ("size", "body") else 429
        return APIError(status, message, None, error.limit or "limit", "rate_limit_error" if status == 429
                        else "invalid_request_error", error.retry_after)
    if isinstance(error, NotFound):
        return APIError(404, message, None, "not_found")
    if isinstance(error, Forbidden):
        return APIError(403, message, None, "forbidden")
    if isinstance(error, BadRequest):
        return APIError(400, message, param_named_in(message), "invalid_value")
    if isinstance(error, (NoWorker, BackendUnavailable)):
        return APIError(503, message, None, error.kind, "server_error")
    if isinstance(error, RequestTimeout):
        return APIError(504, message, None, "timeout", "server_error")
    return APIError(500, message, None, error.kind, "server_error")


_OUR_NAMES = {"max_new_tokens": "max_tokens"}


def openai_words(message: str) -> str:
    """Our setting names in a message as the OpenAI parameter names a client sent."""
    for ours, theirs in _OUR_NAMES.items():
        message = message.replace(ours, theirs)
    return message


def param_named_in(message: str) -> Optional[str]:
    first = message.split(" ", 1)[0]
    return first if first in PARAMETERS else None


# -- the request ---------------------------------------------------------------------------------

@dataclass
class Call:
    """One /v1/completions call, checked."""

    model: str
    prompts: list[str]
    n: int
    max_tokens: int
    echo: bool
    logprobs: Optional[int]
    stream: bool
    include_usage: bool
    user: str
    settings: dict = field(default_factory=dict)  # the CompletionRequest fields every prompt shares

    def request(self, prompt: str) -> CompletionRequest:
        return CompletionRequest(text=prompt, model=self.model, n=self.n, max_new_tokens=self.max_tokens,
                                 raw=True, fresh=True, logprobs=self.logprobs, top_k=0,
                                 repetition_penalty=1.0, **self.settings)


def _number(body: dict, name: str, default, low: float, high: float, whole: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)) \
            or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise APIError(400, f"{name} must be {kind} from {low:g} to {high:g} (got {json.dumps(value)[:40]})", name)
    return int(value) if whole else float(value)


def parse_call(body, offered: list[str], max_prompts: int) -> Call:
    """The call's parameters, checked: APIError naming the first one that cannot be honoured."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in PARAMETERS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter (GET /v1/models lists them)", "model")
    if model not in offered:
        raise APIError(404, f"The model `{model[:200]}` does not exist; this server offers {', '.join(offered)}",
                       "model", "model_not_found")
    prompt = body.get("prompt", "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt must be a string or a non-empty list of strings (token arrays are not "
                            "accepted)", "prompt")
    if len(prompts) > max_prompts:
        raise APIError(400, f"prompt is a list of {len(prompts)} prompts; one call may carry at most {max_prompts}",
                       "prompt")
    suffix = body.get("suffix")
    if suffix not in (None, ""):
        raise APIError(400, "suffix is not supported: GPT-2 models cannot fill in the middle; set your editor "
                            "plug-in to plain completion (no suffix)", "suffix")
    if body.get("logit_bias") not in (None, {}):
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    n = _number(body, "n", 1, LIMITS["n"].low, LIMITS["n"].high, whole=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, f"best_of must equal n ({n}) here: this server returns every completion it makes, so "
                            f"it cannot make {json.dumps(best_of)[:20]} and return the best {n}", "best_of")
    max_tokens = _number(body, "max_tokens", 16, 0, LIMITS["max_new_tokens"].high, whole=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p < LIMITS["top_p"].low:
        raise APIError(400, f"top_p must be at least {LIMITS['top_p'].low:g} here (got {top_p:g}); use "
                            f"temperature 0 for the likeliest tokens", "top_p")
    penalties = {name: _number(body, name, 0.0, -2.0, 2.0) for name in ("presence_penalty", "frequency_penalty")}
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, 0, LIMITS["seed"].high, whole=True)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", None, 0, LIMITS["logprobs"].high, whole=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > MAX_STOPS
                              or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops)):
        raise APIError(400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    flags = {}
    for name in ("echo", "stream"):
        value = body.get(name, False)
        if not isinstance(value, bool) and value is not None:
            raise APIError(400, f"{name} must be true or false", name)
        flags[name] = bool(value)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    user = body.get("user") or ""
    if not isinstance(user, str):
        raise APIError(400, "user must be a string", "user")
    settings = dict(temperature=temperature if temperature > 0 else 1.0, greedy=temperature == 0, top_p=top_p,
                    seed=seed, stop=stops or None, **penalties)
    return Call(model=model, prompts=prompts, n=n, max_tokens=max_tokens, echo=flags["echo"], logprobs=logprobs,
                stream=flags["stream"], include_usage=bool(options.get("include_usage")), user=user[:MAX_USER_CHARS],
                settings=settings)


# -- the answer ----------------------------------------------------------------------------------

@dataclass
class Echo:
    """The prompt as an echoed choice starts: its text and, with logprobs, its tokens."""

    text: str
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)


def finish_reason(ours: Optional[str]) -> Optional[str]:
    return None if ours is None else "stop" if ours in ("stop", "eos") else "length"


def logprobs_block(tokens, logprobs, tops, start: int) -> dict:
    """OpenAI's logprobs object for some tokens whose text begins at offset `start`."""
    offsets, at = [], start
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    return {"tokens": list(tokens), "token_logprobs": list(logprobs), "text_offset": offsets,
            "top_logprobs": [None if t is None else {text: lp for text, lp in t} for t in tops]}


def choice(index: int, text: str, logprobs: Optional[dict], reason: Optional[str]) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}


def non_streamed_choices(call: Call, prompt: str, echo: Optional[Echo], completion: Optional[Completion],
                         first_index: int) -> list[dict]:
    out = []
    suggestions = completion.suggestions if completion is not None else [None] * call.n
    for j, s in enumerate(suggestions):
        text = s.text if s is not None else ""
        block = None
        if call.logprobs is not None:
            head = logprobs_block(echo.tokens, echo.token_logprobs, echo.top_logprobs, 0) if echo else None
            tail = logprobs_block(s.tokens if s else [], s.logprobs if s else [], s.top_logprobs if s else [],
                                  len(prompt))
            block = tail if head is None else {k: head[k] + tail[k] for k in tail}
        out.append(choice(first_index + j, (prompt if call.echo else "") + text, block,
                          finish_reason(s.finish_reason) if s is not None else "length"))
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- running one call ----------------------------------------------------------------------------

class CompletionsAPI:
    def __init__(self, backend, config, streams):
        self.backend = backend
        self.api_key = config.api_key
        self.max_prompts = config.max_prompts
        self.streams = streams  # the app's bound on streams written at once, shared with /wwt/stream

    def authorised(self, request: Request) -> bool:
        if not self.api_key:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def refused_key(self) -> JSONResponse:
        return APIError(401, "Incorrect API key provided: this server requires `Authorization: Bearer <key>` "
                             "(WWT_API_KEY)", None, "invalid_api_key").response()

    async def models(self, request: Request):
        if not self.authorised(request):
            return self.refused_key()
        try:
            names = await asyncio.to_thread(self.backend.models)
        except Exception as e:  # noqa: BLE001 - one place decides what the caller reads
            return api_error(caller_error(e, log, "model list")).response()
        one = request.path_params.get("model")
        if one is not None:  # GET /v1/models/{model}
            if one not in names:
                return APIError(404, f"The model `{one[:200]}` does not exist; this server offers {', '.join(names)}",
                                "model", "model_not_found").response()
            names = [one]
        created = int(time.time())
        precisions = await asyncio.to_thread(self._precisions, names)
        data = [{"id": name, "object": "model", "created": created, "owned_by": "write-with-transformer",
                 "precision": precisions[name]} for name in names]
        return JSONResponse(data[0] if one is not None else {"object": "list", "data": data})

    def _precisions(self, names: list[str]) -> dict[str, Optional[str]]:
        """Each model's precision (an extra field OpenAI clients ignore), None where not known yet."""
        found = {}
        for name in names:
            try:
                found[name] = self.backend.model_info(name).get("precision") or None
            except Exception:  # noqa: BLE001 - the list is answered without it
                found[name] = None
        return found

    async def completions(self, request: Request):
        started = time.perf_counter()
        if not self.authorised(request):
            return self.refused_key()
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - anything that is not JSON
            return APIError(400, "the request body must be JSON").response()
        label = ops.model_label(self.backend, body.get("model") if isinstance(body, dict) else None)
        try:
            offered = await asyncio.to_thread(self.backend.models)
            call = parse_call(body, offered, self.max_prompts)
        except APIError as e:
            ops.record("v1_completions", label, started, "bad_request" if e.status == 400 else "unknown_model")
            return e.response()
        except Exception as e:  # noqa: BLE001
            error = caller_error(e, log, "completions call")
            ops.record("v1_completions", label, started, error.kind)
            return api_error(error).response()
        client = getattr(request.client, "host", None) or None
        if call.user:  # what OpenAI asks `user` for: telling abusers apart in the log; never the identity
            log.info("v1 completions: client %s, user %r, %d prompt(s) x %d", client, call.user, len(call.prompts),
                     call.n)
        weight = len(call.prompts) * call.n
        bound = self.backend.clients.bound
        if bound and weight > bound:
            ops.record("v1_completions", label, started, "bad_request")
            return APIError(400, f"this call asks for {weight} completions ({len(call.prompts)} prompt(s) x n "
                                 f"{call.n}); one client may have at most {bound} in flight (WWT_MAX_WAITING_PER_CLIENT)", "n").response()
        if call.stream and not self.streams.take(len(call.prompts)):
            ops.record("v1_completions", label, started, "busy")
            return api_error(Busy(f"busy: {self.streams.limit} completions are being streamed; try again in a "
                                  f"moment")).response()
        run = Run(self.backend, call, client)
        try:
            run.hold()
        except WWTError as e:
            if call.stream:
                self.streams.give(len(call.prompts))
            ops.record("v1_completions", label, started, e.kind)
            return api_error(e).response()
        if call.stream:
            return await self._streamed(run, request, label, started)
        try:
            answer = await asyncio.to_thread(run.whole)
        except Exception as e:  # noqa: BLE001
            error = caller_error(e, log, "completions call")
            ops.record("v1_completions", label, started, error.kind)
            return api_error(error).response()
        finally:
            run.release()
        ops.record("v1_completions", label, started)
        return JSONResponse(answer)

    async def _streamed(self, run: "Run", request: Request, label: str, started: float):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the server's loop is gone
                run.cancel()

        def pump() -> None:
            try:
                for chunk in run.chunks():
                    put(chunk)
            except Exception as e:  # noqa: BLE001
                put(caller_error(e, log, "completions stream"))
            finally:
                put(None)
                run.release()
                self.streams.give(len(run.call.prompts))

        threading.Thread(target=pump, name="wwt-v1-stream", daemon=True).start()
        first = await queue.get()
        if isinstance(first, WWTError):  # refused before anything was written: a status of its own
            ops.record("v1_completions", label, started, first.kind)
            return api_error(first).response()

        async def body():
            outcome = ["cancelled"]
            item = first
            try:
                while item is not None:
                    if isinstance(item, WWTError):
                        outcome[0] = item.kind
                        yield f"data: {json.dumps(api_error(item).body())}\n\n".encode()
                        return
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode()
                    item = await queue.get()
                outcome[0] = None
                yield b"data: [DONE]\n\n"
            finally:
                ops.record("v1_completions", label, started, outcome[0])
                run.cancel()  # a client that hung up: the work stops at once

        return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)


class Run:
    """The work of one call: a raw completion per prompt, side by side (the engine batches them),
    holding prompts x n places of the client's bound for as long as it runs."""

    def __init__(self, backend, call: Call, client: Optional[str]):
        self.backend, self.call, self.client = backend, call, client
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: list = []
        self._hold = None
        self._cancelled = threading.Event()

    def hold(self) -> None:
        self._hold = self.backend.clients.hold(self.client, self.call.model, weight=len(self.call.prompts) * self.call.n)
        self._hold.__enter__()

    def release(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.__exit__(None, None, None)

    def cancel(self) -> None:
        self._cancelled.set()
        for events in list(self.events):
            events.cancel()

    def _echo(self, prompt: str) -> Optional[Echo]:
        """The prompt's tokens and their log-probabilities (a scoring pass), when echo and logprobs ask."""
        if not self.call.echo and self.call.max_tokens > 0:
            return None
        if (self.call.logprobs is None and self.call.max_tokens > 0) or not prompt:
            return Echo(prompt)  # with max_tokens 0 the scoring pass also counts the prompt's tokens
        scores = self.backend.score(ScoreRequest(text=prompt, model=self.call.model,
                                                 top_logprobs=self.call.logprobs))
        tokens = [t.text for t in scores.tokens]
        # OpenAI's convention: the first token has no log-probability (nothing comes before it)
        lps = [None] + [t.logprob for t in scores.tokens[1:]]
        tops = [None] + [t.top_logprobs for t in scores.tokens[1:]]
        return Echo(prompt, tokens, lps, tops)

    def _start(self):
        """One event stream per prompt (none when max_tokens is 0: only the prompt is returned)."""
        if self.call.max_tokens == 0:
            return [None] * len(self.call.prompts)
        self.events = [self.backend.stream(self.call.request(p), partials=self.call.stream)
                       for p in self.call.prompts]
        return self.events

    def whole(self) -> dict:
        """The answer of a call that is not streamed."""
        streams = self._start()
        results: list = [None] * len(streams)
        errors: list = []

        def consume(i: int, events) -> None:
            try:
                results[i] = answer_of(events)
            except Exception as e:  # noqa: BLE001 - the first failure is the call's answer
                errors.append(e)
                self.cancel()

        threads = [threading.Thread(target=consume, args=(i, s), daemon=True) for i, s in enumerate(streams) if s]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (prompt, completion) in enumerate(zip(self.call.prompts, results)):
            echo = self._echo(prompt)
            choices += non_streamed_choices(self.call, prompt, echo if self.call.echo else None, completion,
                                            i * self.call.n)
            if completion is not None:
                prompt_tokens += completion.prompt_tokens
                completion_tokens += sum(len(s.token_ids) for s in completion.suggestions)
            else:
                prompt_tokens += len(echo.tokens) if echo and echo.tokens else 0
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.call.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.call.model,
                "choices": choices}

    def chunks(self):
        """The chunks of a streamed call, in order: the echoed prompts, then each choice's text as it
        is written (deltas), its finish reason, and with include_usage a last chunk of usage."""
        call = self.call
        streams = self._start()
        sent = {}  # choice index -> (characters sent, tokens sent)
        totals = [0, 0]
        for i, prompt in enumerate(call.prompts):
            if call.echo:
                echo = self._echo(prompt)
                for j in range(call.n):
                    block = (logprobs_block(echo.tokens, echo.token_logprobs, echo.top_logprobs, 0)
                             if call.logprobs is not None else None)
                    yield self.chunk([choice(i * call.n + j, prompt, block, None)])
        merged: queue_module.Queue = queue_module.Queue()

        def pump(i: int, events) -> None:
            try:
                for event in events:
                    merged.put((i, event))
            except Exception as e:  # noqa: BLE001
                merged.put((i, {"type": "error", "exception": e}))
            finally:
                merged.put((i, None))

        live = 0
        for i, events in enumerate(streams):
            if events is None:
                for j in range(call.n):
                    yield self.chunk([choice(i * call.n + j, "", None, "length")])
                continue
            live += 1
            threading.Thread(target=pump, args=(i, events), daemon=True).start()
        while live:
            i, event = merged.get()
            if event is None:
                live -= 1
                continue
            if event["type"] == "error":
                self.cancel()
                error = event.get("exception") or streams[i].error or WWTError(event.get("error") or "no answer")
                raise error
            prompt = call.prompts[i]
            if event["type"] == "partial":
                for s in partials_of(event):
                    delta = self._delta(i * call.n + s.index, s.text, s.tokens, s.logprobs, s.top_logprobs,
                                        len(prompt), sent, final=False)
                    if delta is not None:
                        yield self.chunk([delta])
            elif event["type"] == "done":
                completion = streams[i].completion or Completion.from_dict(event["result"])
                totals[0] += completion.prompt_tokens
                for j, s in enumerate(completion.suggestions):
                    totals[1] += len(s.token_ids)
                    delta = self._delta(i * call.n + j, s.text, s.tokens, s.logprobs, s.top_logprobs, len(prompt),
                                        sent, final=True)
                    yield self.chunk([{**(delta or choice(i * call.n + j, "", None, None)),
                                       "finish_reason": finish_reason(s.finish_reason)}])
        if call.include_usage:
            yield {**self.chunk([]), "usage": usage(*totals)}

    def _delta(self, index: int, text: str, tokens: list, logprobs: list, tops: list, start: int, sent: dict,
               final: bool) -> Optional[dict]:
        """What choice `index` adds to what was sent: text (and its whole tokens, with logprobs)."""
        chars, count = sent.get(index, (0, 0))
        if self.call.logprobs is None:
            if len(text) <= chars:
                return None
            sent[index] = (len(text), 0)
            return choice(index, text[chars:], None, None)
        # only tokens that lie wholly in the text shown so far (the end may be held back for a stop string)
        end, take = chars, count
        while take < len(tokens) and (final or end + len(tokens[take]) <= len(text)):
            end += len(tokens[take])
            take += 1
        if take == count and not (final and len(text) > chars):
            return None
        piece = text[chars:] if final else text[chars:end]
        sent[index] = (chars + len(piece), take)
        return choice(index, piece, logprobs_block(tokens[count:take], logprobs[count:take], tops[count:take],
                                                   start + chars), None)


def not_found(request: Request):
    path = request.url.path
    if path.rstrip("/").endswith("/chat/completions"):
        message = ("/v1/chat/completions is not offered: these are not chat models; use /v1/completions with a "
                   "prompt (plain text completion)")
    else:
        message = f"{path[:200]} is not a route of this server; it offers GET /v1/models and POST /v1/completions"
    return APIError(404, message, None, "unknown_url").response()


def routes(backend, config, streams) -> list:
    """The /v1 routes (server.app_kwargs mounts them before Gradio's)."""
    api = CompletionsAPI(backend, config, streams)

    async def missing(request: Request):
        if not api.authorised(request):
            return api.refused_key()
        return not_found(request)

    return [Route(f"{PREFIX}/models", api.models, methods=["GET"]),
            Route(PREFIX + "/models/{model:path}", api.models, methods=["GET"]),
            Route(f"{PREFIX}/completions", api.completions, methods=["POST"]),
            Route(PREFIX + "/{rest:path}", missing, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
