"""A newer request from the same editor cancels the older one in the embedded backend."""

import threading
import time

import pytest

from app.backends.local import LocalBackend
from model.errors import Cancelled
from model.types import CompletionRequest


@pytest.fixture
def slow_backend(tiny_gpt2, tmp_path):
    backend = LocalBackend([f"tiny={tiny_gpt2}"], documents=None, memory_budget_gb=8)
    engine = backend.engine("tiny")
    inner = engine.model.transformer.forward

    def slow_forward(*args, **kwargs):  # every step takes a while, so a request is still running
        time.sleep(0.01)
        return inner(*args, **kwargs)

    engine.model.transformer.forward = slow_forward
    yield backend, engine
    backend.close()


def _request(text, tokens):
    return CompletionRequest(text=text, model="tiny", n=2, max_new_tokens=tokens, stop=None, seed=0)


def _start(backend, request, key, box):
    def call():
        try:
            box["result"] = backend.complete(request, timeout=60, supersede=key)
        except Exception as e:
            box["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def _wait_running(engine, requests):
    deadline = time.monotonic() + 30
    while engine.stats()["requests"] < requests or engine.stats()["tokens_decoded"] == 0:
        assert time.monotonic() < deadline, "the first request never started decoding"
        time.sleep(0.005)


def test_same_key_cancels_the_running_request_and_frees_its_slots(slow_backend):
    backend, engine = slow_backend
    box = {}
    older = _start(backend, _request("Once upon a time", 120), "editor-1", box)
    _wait_running(engine, 1)
    newer = backend.complete(_request("Once upon a time there", 3), timeout=60, supersede="editor-1")
    older.join(60)
    assert newer.suggestions
    assert isinstance(box.get("error"), Cancelled), box
    assert not engine.scheduler.pool.busy()
    assert backend.superseding() == []  # nothing left behind for the key


def test_other_keys_and_no_key_are_left_alone(slow_backend):
    backend, engine = slow_backend
    box = {}
    older = _start(backend, _request("Once upon a time", 40), "editor-1", box)
    _wait_running(engine, 1)
    assert backend.complete(_request("Another text", 3), timeout=60, supersede="editor-2").suggestions
    assert backend.complete(_request("A third text", 3), timeout=60).suggestions
    older.join(60)
    assert "result" in box and box["result"].suggestions, box
