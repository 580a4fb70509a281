"""Cancellation and time limits: a cancelled, timed-out or closed request frees its slots at once,
and the engine goes on serving.
"""

from __future__ import annotations

import pytest

from model.errors import Cancelled, RequestTimeout
from model.serving.engine_config import EngineConfig
from model.types import CompletionRequest
from model_support import STORY, assert_good_suggestions, hold_every_slot, idle, suggest, wait_until


def test_cancel_frees_the_slots(make_engine):
    # The slowed running request puts this engine ~0.7 s behind, near the 1 s pace bound: not what is tested here.
    engine = make_engine(slots=4, delay=0.005, config=EngineConfig(max_wait_s=None))
    pool = engine.scheduler.pool
    running = engine.submit(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(pool.busy()) == 3)
    queued = engine.submit(CompletionRequest("Hello there", n=2, max_new_tokens=5))  # waits for slots
    queued.cancel()
    running.cancel()
    with pytest.raises(Cancelled):
        running.result(timeout=30)
    with pytest.raises(Cancelled):
        queued.result(timeout=30)
    assert idle(engine)
    # The engine goes on serving.
    assert_good_suggestions(suggest(engine, "Hello there", n=2, max_new_tokens=4, seed=1))


def test_cancel_behind_a_waiting_request_is_prompt(make_engine):
    """A cancelled or timed-out request that waits behind another waiting one is answered at once."""
    # The slowed running request puts this engine ~0.7 s behind, near the 1 s pace bound: not what is tested here.
    engine = make_engine(slots=4, delay=0.005, config=EngineConfig(max_wait_s=None))
    pool = engine.scheduler.pool
    running = engine.submit(CompletionRequest(STORY, n=4, greedy=True, max_new_tokens=100, stop=None))
    assert wait_until(lambda: len(pool.busy()) == 4)
    blocked = engine.submit(CompletionRequest("Hello there", n=2, greedy=True, max_new_tokens=4))
    behind = engine.submit(CompletionRequest("Once upon", n=1, greedy=True, max_new_tokens=4))
    limited = engine.submit(CompletionRequest("Once upon", n=1, greedy=True, max_new_tokens=4, max_time=0.05))
    behind.cancel()
    with pytest.raises(Cancelled):
        behind.result(timeout=30)
    assert limited.result(timeout=30)[0] == []  # out of time before it ever got a slot
    assert not running.done(), "the cancelled request waited for the running one to finish"
    assert running.result(timeout=60)[0] and blocked.result(timeout=60)[0]
    assert idle(engine)


def test_handle_timeout_raises_and_frees_the_slots(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    handle = engine.submit(CompletionRequest(STORY, n=3, greedy=True, max_new_tokens=100, stop=None))
    with pytest.raises(RequestTimeout):
        handle.result(timeout=0.001)
    assert idle(engine)
    with pytest.raises(Cancelled):  # the timed-out request was cancelled, not left running
        handle.result(timeout=30)
    with pytest.raises(RequestTimeout):
        engine.complete(CompletionRequest(STORY, n=1, max_new_tokens=100, stop=None), timeout=0.001)
    assert idle(engine)
    assert_good_suggestions(suggest(engine, STORY, n=1, max_new_tokens=3, seed=2))


def test_max_time_returns_partial_suggestions(make_engine):
    engine = make_engine(slots=4, delay=0.01)
    done = engine.complete(CompletionRequest(STORY, n=2, greedy=True, max_new_tokens=120, stop=None,
                                             max_time=0.15))
    assert done.suggestions, "max_time returned nothing"
    for s in done.suggestions:
        assert s.finish_reason == "time"
        assert 0 < len(s.token_ids) < 120 and s.text.strip()
    # What was cut short is the start of the full answer.
    full = suggest(make_engine(slots=4), STORY, n=2, greedy=True, max_new_tokens=120, stop=None)
    for part, whole in zip(done.suggestions, full):
        assert whole.token_ids[:len(part.token_ids)] == part.token_ids
    assert idle(engine)


def test_time_spent_waiting_counts_toward_max_time(make_engine):
    # The slowed running request puts this engine ~0.7 s behind, near the 1 s pace bound: not what is tested here.
    engine = make_engine(slots=4, delay=0.005, config=EngineConfig(max_wait_s=None))
    running = hold_every_slot(engine)
    limited = engine.submit(CompletionRequest("Once upon", n=1, greedy=True, max_new_tokens=50, max_time=0.3))
    assert limited.job.deadline == pytest.approx(limited.job.submitted + 0.3)
    suggestions, timings = limited.result(timeout=30)
    assert suggestions == []  # its whole max_time went by in the waiting list
    assert not running.done(), "max_time started only when the request got its slots"
    assert timings.total_ms >= 300
    running.cancel()
    assert idle(engine)


def test_close_cancels_what_is_pending(make_engine):
    engine = make_engine(slots=4, delay=0.005)
    running = engine.submit(CompletionRequest(STORY, n=4, greedy=True, max_new_tokens=100, stop=None))
    waiting = engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4))
    engine.close()
    for handle in (running, waiting):
        with pytest.raises(Cancelled):
            handle.result(timeout=30)
    with pytest.raises(Cancelled):
        engine.submit(CompletionRequest("Hello", n=1))
