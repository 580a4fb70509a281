"""The embedded backend: engines in this process, loaded on first use, unloaded past a memory budget."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Optional

from model.errors import UnknownModel, caller_error
from model.network.config import GPTConfig
from model.network.known import KNOWN_SHAPES, ModelSpec, parse_model_spec
from model.serving.engine_config import EngineConfig
from model.streaming import partial_event
from model.types import (Answer, AnswerRequest, Classification, ClassifyRequest, CompletionRequest, ScoreRequest,
                         Scores)

from .base import Backend, ClientBound, EventStream
from .documents import FileDocumentStore

log = logging.getLogger(__name__)


class LocalBackend(Backend):
    """Engines in this process, loaded on first use; the least recently used is unloaded past a memory budget."""

    kind = "local"

    def __init__(self, models: list[str], device: Optional[str] = None, dtype: Optional[str] = None, *,
                 engine_config: Optional[EngineConfig] = None, slots: Optional[int] = None,
                 memory_budget_gb: float = 8.0, request_timeout: Optional[float] = 60.0,
                 documents: Optional[FileDocumentStore] = None, engine_factory=None):
        """`engine_config` sets up every engine (`slots` is a shorthand for its field); `dtype` is the
        precision of specs that name none; past `memory_budget_gb` the least recently used engine
        is unloaded; `request_timeout` is how long a call waits when it names no timeout."""
        specs = [parse_model_spec(m) for m in models if m and m.strip()]
        if not specs:
            raise UnknownModel("no model to serve")
        self.specs: dict[str, ModelSpec] = {s.name: s for s in specs}
        self.device = device
        self.dtype = dtype  # for specs that name no precision
        engine_config = engine_config or EngineConfig()
        self.engine_config = engine_config.with_(slots=slots) if slots else engine_config
        self.budget = memory_budget_gb * (1 << 30)
        self.clients = ClientBound(self.engine_config.max_waiting_per_client)  # single passes; the engine holds completions
        self.request_timeout = request_timeout
        self.documents = documents if documents is not None else FileDocumentStore()
        self._engines: "OrderedDict[str, object]" = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {name: threading.Lock() for name in self.specs}
        self._latest: dict[str, object] = {}  # supersede key -> the request still running for it
        if engine_factory is None:
            from model.serving.engine import Engine

            engine_factory = Engine.from_pretrained
        self._factory = engine_factory

    def models(self) -> list[str]:
        return list(self.specs)

    def _spec(self, name: str) -> ModelSpec:
        name = name or next(iter(self.specs))
        if name not in self.specs:
            raise UnknownModel(f"unknown model {name!r}; this app offers {', '.join(self.specs)}")
        return self.specs[name]

    def engine(self, name: str = ""):
        """The engine for `name`, loading it (and unloading others past the budget) on first use."""
        spec = self._spec(name)
        with self._lock:
            if spec.name in self._engines:
                self._engines.move_to_end(spec.name)
                return self._engines[spec.name]
        with self._loading[spec.name]:
            with self._lock:
                if spec.name in self._engines:
                    return self._engines[spec.name]
            engine = self._factory(spec.source, device=self.device, dtype=spec.precision or self.dtype,
                                   config=self.engine_config, name=spec.name)
            with self._lock:
                self._engines[spec.name] = engine
                self._evict(keep=spec.name)
            return engine

    def _evict(self, keep: str) -> None:
        used = sum(e.memory_bytes() for e in self._engines.values())
        for name in list(self._engines):
            if used <= self.budget:
                break
            if name == keep:
                continue
            old = self._engines.pop(name)
            used -= old.memory_bytes()
            log.info("unloading %s to stay within the memory budget", name)
            old.close()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def model_info(self, name: str) -> dict:
        spec = self._spec(name)
        info = {"name": spec.name, "source": spec.source, "loaded": spec.name in self._engines, "backend": "local",
                "precision": spec.precision or self.dtype or ""}
        engine = self._engines.get(spec.name)
        if engine is not None:
            info.update(parameters=engine.config.parameter_count(), device=str(engine.device),
                        dtype=str(engine.dtype).replace("torch.", ""), precision=engine.precision,
                        weight_bytes=engine.weight_bytes(), rows=engine.rows,
                        kv_tokens=engine.cache.tokens)
        elif spec.source in KNOWN_SHAPES:
            info["parameters"] = GPTConfig(**KNOWN_SHAPES[spec.source],
                                           model_type="openai-gpt" if spec.source == "openai-gpt" else "gpt2"
                                           ).parameter_count()
            if not info["precision"]:  # what it will load in (model/serving/loading.default_precision)
                import torch

                from model.serving.loading import default_device, default_precision

                device = torch.device(self.device) if self.device else default_device()
                info["precision"] = default_precision(info["parameters"], device)
        return info

    def prepare(self, name: str) -> None:
        self.engine(name)

    def stream(self, request: CompletionRequest, *, client: Optional[str] = None, supersede: Optional[str] = None,
               timeout: Optional[float] = None, partials: bool = True) -> EventStream:
        """Partial events from the engine's snapshots as each step is decoded (none are built when
        `partials` is False). The engine holds `client` (else the supersede key) to its per-client
        waiting bound; cancelling the stream, or a newer request under the same supersede key,
        frees the slots at the next step."""
        timeout = self.request_timeout if timeout is None else timeout

        def events():
            engine = self.engine(request.model)
            handle = self._start(engine, request, supersede, client)
            stream.on_cancel(handle.cancel)
            try:
                if not partials:
                    yield stream.done(engine.result(handle, timeout))
                    return
                for update in engine.stream(handle, timeout):
                    yield partial_event(update.suggestions) if update.completion is None else stream.done(update.completion)
            finally:
                self._ended(supersede, handle)

        stream = EventStream(events())
        return stream

    def _start(self, engine, request: CompletionRequest, supersede: Optional[str], client: Optional[str]):
        """Submit; with a supersede key, cancel the older request under it first (its answer would be
        stale: free its slots now, and its waiting place, so a fast typist is not refused as busy
        because of their own older keystrokes)."""
        if supersede is None:
            return engine.submit(request, client)
        with self._lock:
            older = self._latest.pop(supersede, None)
            if older is not None:
                older.cancel()
            handle = engine.submit(request, client if client is not None else supersede)
            self._latest[supersede] = handle
        return handle

    def _ended(self, supersede: Optional[str], handle) -> None:
        if supersede is not None:
            with self._lock:
                if self._latest.get(supersede) is handle:
                    del self._latest[supersede]

    def superseding(self) -> list[str]:
        """The supersede keys that still have a request running (none is kept once it ends)."""
        with self._lock:
            return sorted(self._latest)

    def classify(self, request: ClassifyRequest, timeout: Optional[float] = None,
                 client: Optional[str] = None) -> Classification:
        with self.clients.hold(client, request.model or self.default_model()):
            return self.engine(request.model).classify(request.text, request.labels)

    def answer(self, request: AnswerRequest, timeout: Optional[float] = None, client: Optional[str] = None) -> Answer:
        with self.clients.hold(client, request.model or self.default_model()):
            return self.engine(request.model).answer(request.question, request.context)

    def score(self, request: ScoreRequest, timeout: Optional[float] = None, client: Optional[str] = None) -> Scores:
        with self.clients.hold(client, request.model or self.default_model()):
            return self.engine(request.model).score(request.text, request.top_logprobs)

    def save_document(self, text: str, client: Optional[str] = None) -> tuple[str, str]:
        return self.documents.save(text, client)

    def delete_document(self, doc_id: str, delete_key: Optional[str]) -> None:
        return self.documents.delete(doc_id, delete_key)

    def load_document(self, doc_id: str) -> str:
        return self.documents.load(doc_id)

    def health(self) -> dict:
        out = {"ready": False, "backend": self.kind}
        try:
            default = out["model"] = self.default_model()
            out["loaded"] = self.loaded()
            out["ready"] = default in out["loaded"]
            out["precision"] = self.model_info(default).get("precision") or None
            if not out["ready"]:
                out["reason"] = f"{default} is not loaded"
        except Exception as e:  # never raises: not ready, and why
            out["reason"] = caller_error(e, log, "health check").message
        return out

    def model_gauges(self) -> dict[str, dict]:
        with self._lock:
            engines = dict(self._engines)
        return {name: {"loaded": int(name in engines),
                       "queue_depth": engines[name].scheduler.waiting() if name in engines else 0,
                       **(engines[name].kv_gauges() if name in engines else {})}
                for name in self.models()}

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
