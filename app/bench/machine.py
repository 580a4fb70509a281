"""What machine a report ran on: the CPU's model name and the vector instructions that decide which
kernels are fast on it (AVX-512 VNNI for int8, AVX-512 BF16 / AMX for bfloat16 activations)."""

from __future__ import annotations

import platform
from pathlib import Path

RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo, else what the platform module says."""
    for line in _cpuinfo():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> dict[str, bool]:
    """Each of RELEVANT_FLAGS: whether the CPU reports it (all False where /proc/cpuinfo is absent)."""
    flags: set[str] = set()
    for line in _cpuinfo():
        if line.startswith("flags") and ":" in line:
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: name in flags for name in RELEVANT_FLAGS}
