"""Admission: the waiting-list bounds (in all, per client) and the pace bound refuse at once and
change nothing; the backlog estimate they use. Each engine is built with the bounds its test sets.
"""

from __future__ import annotations

import pytest

from model.errors import Busy
from model.serving.engine_config import EngineConfig
from model.types import CompletionRequest
from model_support import assert_good_suggestions, hold_every_slot, idle, suggest


def test_a_full_waiting_list_refuses_at_once_and_changes_nothing(make_engine):
    # The waiting-list bound alone: the pace bound would refuse this slowed engine's flood first.
    engine = make_engine(slots=4, delay=0.005, config=EngineConfig(max_waiting=3, max_wait_s=None))
    running = hold_every_slot(engine)
    waiting = [engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4)) for _ in range(3)]
    before, queued = engine.stats(), list(engine.scheduler.planner.waiting)
    with pytest.raises(Busy) as refused:
        engine.submit(CompletionRequest("Once upon", n=1, max_new_tokens=4))
    assert refused.value.kind == "busy"
    assert refused.value.message == f"busy: 3 requests are waiting for {engine.name}; try again in a moment"
    assert not running.done(), "the refusal waited for the running request"
    assert engine.stats() == before and list(engine.scheduler.planner.waiting) == queued
    waiting[0].cancel()  # a cancelled request holds no waiting place
    accepted = engine.submit(CompletionRequest("Once upon", n=1, max_new_tokens=4))
    for handle in [running, accepted, *waiting[1:]]:
        handle.cancel()
    assert idle(engine)
    assert_good_suggestions(suggest(engine, "Hello there", n=2, max_new_tokens=4, seed=1))


def test_one_client_holds_at_most_its_share_of_the_waiting_list(make_engine):
    # The waiting-list bounds alone: the pace bound would refuse this slowed engine's flood first.
    engine = make_engine(slots=4, delay=0.005,
                         config=EngineConfig(max_waiting=10, max_waiting_per_client=2, max_wait_s=None))
    running = hold_every_slot(engine)
    mine = [engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4), client="10.0.0.1")
            for _ in range(2)]
    with pytest.raises(Busy, match="2 of your requests are already waiting"):
        engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4), client="10.0.0.1")
    others = [engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4), client="10.0.0.2"),
              engine.submit(CompletionRequest("Hello", n=1, max_new_tokens=4))]  # no client: not counted
    mine[0].cancel()
    mine.append(engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4), client="10.0.0.1"))
    for handle in [running, *mine, *others]:
        handle.cancel()
    assert idle(engine)


def test_the_backlog_estimate_is_the_work_left_in_the_engine_over_its_recent_rates():
    from types import SimpleNamespace

    from model.serving.planner import WINDOW_S, Backlog

    now = [100.0]
    backlog = Backlog(clock=lambda: now[0])
    job = SimpleNamespace(prompt=SimpleNamespace(tokens=list(range(300))), prefilled=100, n=2, max_new_tokens=10,
                          rows=[SimpleNamespace(tokens=[1, 2, 3, 4])])
    assert backlog.expected_wait([job]) is None  # nothing has run yet: no rate known
    backlog.prefill.add(200, 1.0)
    backlog.prefill.add(200, 1.0)  # 200 prompt tokens a second
    backlog.decode.add(8, 1.0)     # 8 suggestion tokens a second
    # 200 prompt tokens left (1 s) and 2 x 10 - 4 = 16 suggestion tokens (2 s)
    assert backlog.expected_wait([job]) == pytest.approx(3.0)
    assert backlog.expected_wait([job, job]) == pytest.approx(6.0)
    assert backlog.expected_wait([]) == 0.0  # an idle engine is never behind
    now[0] += WINDOW_S + 1
    backlog.prefill.add(100, 1.0)  # the window holds only the new sample now
    assert backlog.expected_wait([job]) == pytest.approx(2.0 + 2.0)
    now[0] += WINDOW_S + 1
    assert backlog.expected_wait([job]) == pytest.approx(2.0 + 2.0)  # idle since: the last rates stand
    backlog.turn(3.0, 2.0)  # turns take half as long again as their prefill and decode
    assert backlog.expected_wait([job]) == pytest.approx((2.0 + 2.0) * 1.5)


def _behind(engine):
    """The rates from one request, then every slot held: how far behind the engine is."""
    engine.complete(CompletionRequest("Hello there", n=1, max_new_tokens=4, seed=1))  # the rates
    running = hold_every_slot(engine)  # 4 x 100 tokens to decode: seconds of work at 0.02 s a step
    return running, engine.scheduler.backlog.expected_wait(engine.scheduler.planner.running)


def test_an_engine_too_far_behind_refuses_at_once_and_changes_nothing(make_engine):
    engine = make_engine(slots=4, delay=0.02, config=EngineConfig(max_wait_s=0.5))
    running, behind = _behind(engine)
    assert behind > 0.5, behind
    queued = list(engine.scheduler.planner.waiting)
    with pytest.raises(Busy, match=rf"busy: {engine.name} is about (\d\.\d|\d\d+) s behind; try again in a moment"):
        engine.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4))
    assert list(engine.scheduler.planner.waiting) == queued  # a refusal queues nothing
    # The same work on an engine whose bound is far enough: accepted.
    far = make_engine(slots=4, delay=0.02, config=EngineConfig(max_wait_s=behind * 10))
    far_running, far_behind = _behind(far)
    assert far_behind < behind * 10, (far_behind, behind)
    accepted = far.submit(CompletionRequest("Hello there", n=1, max_new_tokens=4))
    for handle in [running, far_running, accepted]:
        handle.cancel()
    assert idle(engine) and idle(far)
    # An idle engine accepts whatever its bound.
    assert_good_suggestions(suggest(engine, "Hello there", n=2, max_new_tokens=4, seed=1))
