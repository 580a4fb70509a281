"""How an engine is set up: every knob the engine reads, in one frozen value built at the edge.

The command line, the worker, the app server and the Spaces entry build it once from the
settings registry (`EngineConfig.from_settings()`); tests and benchmarks build it directly.
Nothing below reads the environment, and nothing is changed on an engine after it is made.
The defaults here are the registry's defaults: the production policy.
Standard library only, so the app can build one without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .. import settings


@dataclass(frozen=True)
class EngineConfig:
    # KV cache: shorthand for kv_tokens = slots x context and rows = slots (None: chosen by device and model size)
    slots: Optional[int] = None
    # KV cache: positions held, all documents and suggestions together (None: from slots, or by device)
    kv_tokens: Optional[int] = None
    # Suggestions decoding at once, the rows of a step (None: slots, or by device)
    rows: Optional[int] = None
    # KV cache: positions per block (docs/performance.md, "Many writers: the KV pool", has the measurement)
    kv_block: int = 16
    # Which held document a full KV cache evicts: "next-use" or "lru" (eviction.py)
    kv_eviction: str = "next-use"
    # CPU float32: keep a oneDNN-packed copy of each matrix (faster steps of several rows)
    cpu_pack: bool = True
    # CPU float32: the one-row product ("auto" times the candidates at load; split, plain, packed)
    cpu_one_row: str = "auto"
    # CPU int8: the product ("auto" times both at load; dynamic, weight-only), see int8_kernels.py
    cpu_int8: str = "auto"
    # KV cache dtype ("auto": bfloat16 for quantized models on CPU, else the compute dtype)
    kv_dtype: str = "auto"
    # GPU: capture the decode step as a CUDA graph (None: on CUDA only; True on CPU runs it eagerly)
    cuda_graph: Optional[bool] = None
    # Admission: requests waiting for slots, per client, and seconds of work behind (None: no bound)
    max_waiting: Optional[int] = 32
    max_waiting_per_client: Optional[int] = 4
    max_wait_s: Optional[float] = 1.0

    @classmethod
    def from_settings(cls) -> "EngineConfig":
        """The configuration the registry's variables describe (0 turns a bound off)."""
        return cls(slots=settings.get_int("WWT_SLOTS", default=None) or None,
                   kv_tokens=settings.get_int("WWT_KV_TOKENS", default=None) or None,
                   rows=settings.get_int("WWT_ROWS", default=None) or None,
                   kv_eviction=settings.get_choice("WWT_KV_EVICTION", ("next-use", "lru")),
                   cpu_pack=settings.get_bool("WWT_CPU_PACK"),
                   cpu_one_row=settings.get_choice("WWT_CPU_ONE_ROW", ("auto", "split", "plain", "packed")),
                   cpu_int8=settings.get_choice("WWT_CPU_INT8", ("auto", "dynamic", "weight-only")),
                   kv_dtype=settings.get_choice("WWT_KV_DTYPE", ("auto", "float32", "bfloat16", "float16")),
                   cuda_graph=None if settings.get_bool("WWT_CUDA_GRAPH") else False,
                   max_waiting=settings.get_int("WWT_MAX_WAITING", default=None) or None,
                   max_waiting_per_client=settings.get_int("WWT_MAX_WAITING_PER_CLIENT", default=None) or None,
                   max_wait_s=settings.get_float("WWT_MAX_WAIT_S", default=None) or None)

    def unbounded(self) -> "EngineConfig":
        """This configuration with every request let in (benchmarks measure speed, not refusals)."""
        return replace(self, max_waiting=None, max_waiting_per_client=None, max_wait_s=None)

    def with_(self, **changes) -> "EngineConfig":
        return replace(self, **changes)
