"""Where model work runs: setup in a short-lived thread, everything else on the model thread."""

from __future__ import annotations

import threading

import pytest
import torch

from model.serving.threads import ModelThread, in_fresh_thread, model_thread


def test_in_fresh_thread_returns_the_result_from_a_thread_that_is_gone():
    seen = {}

    def work(a, b=0):
        seen["thread"] = threading.current_thread()
        return torch.arange(a).sum().item() + b

    assert in_fresh_thread(work, 5, b=1) == 11
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_in_fresh_thread_raises_what_the_work_raised():
    with pytest.raises(KeyError, match="missing"):
        in_fresh_thread(lambda: {}["missing"])


def test_one_cpu_model_thread_per_process():
    cpu = model_thread(torch.device("cpu"))
    assert model_thread(torch.device("cpu")) is cpu
    assert isinstance(cpu, ModelThread) and cpu.thread.is_alive()
