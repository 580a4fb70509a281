"""Which call a CPU decode step uses for its one-row products, chosen by timing them here.

A one-row product only streams a weight matrix from memory, and which call streams fastest
depends on the CPU: splitting the product into one slab per thread wins on some machines and
loses on others (the README has the figures). So the model times each
candidate over its own matrices, in the order a decode step reads them (so that they come
from memory, as in a real step, and not from a warm cache), and keeps the fastest.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch

KERNELS = ("split", "plain", "packed")


def candidates(modules: Sequence[torch.nn.Module]) -> list[str]:
    """The kernels every module can run: "packed" only with packed copies, "split" only with threads
    to split over, "split" and "plain" only with plain weights (a packed matrix has none)."""
    found = []
    if all(getattr(m, "has_plain", True) for m in modules):
        found = ["split", "plain"] if torch.get_num_threads() > 1 else ["plain"]
    if modules and all(m.packed is not None for m in modules):
        found.append("packed")
    return found or ["plain"]


def _sweep(modules: Sequence[torch.nn.Module]) -> Callable[[], None]:
    """One pass over `modules` with a zero row each, as one decode step would make them."""
    rows = [torch.zeros(1, m.n_in) for m in modules]

    def run() -> None:
        for module, row in zip(modules, rows):
            module(row)

    return run


def _use(modules: Sequence[torch.nn.Module], kernel: Optional[str]) -> None:
    for module in modules:
        module.one_row = kernel


@torch.inference_mode()
def choose(layers: Sequence[torch.nn.Module], head: Optional[torch.nn.Module],
           trials: int = 3) -> dict[str, str]:
    """{"layers": kernel, "head": kernel}: the fastest one-row kernel of each, timed here.

    Candidates take turns within each trial, so a change in the machine's load hits them
    alike; the median over trials decides. The head is timed right after a pass over the
    layers, so that its weights, too, come from memory.
    """
    torch.set_num_threads(torch.get_num_threads())  # this thread's OpenMP pool as configured
    chosen: dict[str, str] = {}
    if layers:
        kinds = candidates(layers)
        sweep = _sweep(layers)
        times = {kind: [] for kind in kinds}
        for _ in range(trials + 1):  # the first round warms up (allocations, thread pool)
            for kind in kinds:
                _use(layers, kind)
                start = time.perf_counter()
                sweep()
                times[kind].append(time.perf_counter() - start)
        chosen["layers"] = min(kinds, key=lambda kind: statistics.median(times[kind][1:]))
        _use(layers, chosen["layers"])
    if head is not None:
        kinds = candidates([head])
        before = _sweep(layers) if layers else (lambda: None)
        row = torch.zeros(1, head.n_in)
        times = {kind: [] for kind in kinds}
        for _ in range(trials + 1):
            for kind in kinds:
                head.one_row = kind
                before()  # pushes the head's weights out of the cache, as a decode step does
                start = time.perf_counter()
                head(row)
                times[kind].append(time.perf_counter() - start)
        chosen["head"] = min(kinds, key=lambda kind: statistics.median(times[kind][1:]))
        head.one_row = chosen["head"]
    return chosen


def apply(layers: Sequence[torch.nn.Module], head: Optional[torch.nn.Module], kernel: str) -> dict[str, str]:
    """Use `kernel` for every one-row product ("auto": time them and pick, see `choose`)."""
    if kernel == "auto":
        return choose(layers, head)
    if kernel not in KERNELS:
        raise ValueError(f"unknown one-row kernel {kernel!r}; choose auto or one of {', '.join(KERNELS)}")
    chosen = {}
    for part, modules in (("layers", list(layers)), ("head", [head] if head is not None else [])):
        if modules:
            possible = candidates(modules)
            kind = kernel if kernel in possible else ("plain" if "plain" in possible else possible[-1])
            _use(modules, kind)
            chosen[part] = kind
    return chosen
