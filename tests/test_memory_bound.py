"""What keeps `wwt serve`'s memory bounded however many calls it answers (app/web/call_memory.py; the
figures are `python -m app.bench.memory`'s): Gradio's per-call bookkeeping is swept, results nobody
reads are kept for a bounded time and number, and heap trims follow requests and stop when they do.

The sweep's rules on a stand-in queue, then real plain-HTTP calls against the app as `wwt serve`
builds it (in this process, with a scripted backend). Nothing here times anything.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
import urllib.error
import urllib.request

import pytest

from app.web import call_memory as memory
from model_support import wait_until
from ui_support import ScriptedBackend, launch_in_process, post_json


class FakeQueue:
    def __init__(self):
        self.pending_event_ids_session: dict = {}
        self.pending_messages_per_session: dict = {}
        self.event_ids_to_events: dict = {}

    def add(self, session: str, event: str, live: bool, unread: int = 0):
        self.pending_event_ids_session.setdefault(session, set())
        if live or unread:
            self.pending_event_ids_session[session].add(event)
        box = self.pending_messages_per_session.setdefault(session, asyncio.Queue())
        for _ in range(unread):
            box.put_nowait("message")
        if live:
            self.event_ids_to_events[event] = object()


def test_sweep_drops_read_calls_keeps_live_ones_and_bounds_unread(monkeypatch):
    monkeypatch.setattr(memory, "UNREAD_MAX", 2)
    monkeypatch.setattr(memory, "UNREAD_TTL_S", 60.0)
    q, unread = FakeQueue(), {}
    for i in range(50):
        q.add(f"read{i}", f"r{i}", live=False)            # finished and read: an empty set, an empty box
    q.add("old-live", "L", live=True)                     # queued/running: never touched, however old
    for i in range(4):
        q.add(f"unread{i}", f"u{i}", live=False, unread=1)  # finished, result not fetched
    memory.sweep(q, unread, now=0.0)
    kept = set(q.pending_event_ids_session)
    assert kept == {"old-live", "unread2", "unread3"}, kept  # the two newest unread, oldest dropped first
    assert set(q.pending_messages_per_session) == kept
    memory.sweep(q, unread, now=59.0)
    assert set(q.pending_event_ids_session) == kept
    memory.sweep(q, unread, now=61.0)                     # past the TTL
    assert set(q.pending_event_ids_session) == {"old-live"} == set(q.pending_messages_per_session)
    assert unread == {}


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(memory, "SWEEP_EVERY_S", 0.0)  # sweep after every request: exact counts below
    demo, url = launch_in_process(ScriptedBackend(models=("m1",)))
    try:
        yield demo, url
    finally:
        demo.close()


def _call(url: str, i: int) -> bytes:
    status, out = post_json(url + "gradio_api/call/complete", {"data": [f"Hello {i}"]})
    assert status == 200, (status, out)
    with urllib.request.urlopen(f"{url}gradio_api/call/complete/{json.loads(out)['event_id']}", timeout=30) as r:
        return r.read()


def _kept(queue) -> tuple[int, int]:
    return len(queue.pending_event_ids_session), len(queue.pending_messages_per_session)


def test_finished_calls_leave_nothing_behind(app):
    """Without the sweep, each of these 300 calls leaves an entry in both tables for good."""
    demo, url = app
    for i in range(300):
        assert b"event: complete" in _call(url, i)
    ids, boxes = _kept(demo._queue)
    assert ids <= 2 and boxes <= 2, (ids, boxes)  # at most the last call, whose event may still be closing
    assert demo._queue.ANALYTICS_MAX_EVENTS <= 1000  # GRADIO_ANALYTICS_MAX_EVENTS (app/server.py), not 10,000


def test_unread_results_are_bounded_then_expire(app, monkeypatch):
    monkeypatch.setattr(memory, "UNREAD_MAX", 20)
    demo, url = app
    queue = demo._queue
    events = []
    for i in range(60):  # POST only: nobody fetches these results
        status, out = post_json(url + "gradio_api/call/complete", {"data": [f"never read {i}"]})
        assert status == 200, (status, out)
        events.append(json.loads(out)["event_id"])
    assert wait_until(lambda: not queue.event_ids_to_events, 30)  # all finished
    _call(url, 0)  # any request sweeps
    ids, boxes = _kept(queue)
    assert ids <= 21 and boxes <= 21, (ids, boxes)
    # the newest unread result can still be fetched; a dropped one is a clear 404, not a hang
    with urllib.request.urlopen(f"{url}gradio_api/call/complete/{events[-1]}", timeout=30) as r:
        assert b"event: complete" in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}gradio_api/call/complete/{events[0]}", timeout=30)
    assert e.value.code == 404 and "no result for this call" in json.loads(e.value.read())["error"]
    monkeypatch.setattr(memory, "UNREAD_TTL_S", 0.0)
    _call(url, 1)
    assert _kept(queue) <= (1, 1)


def test_heap_trims_follow_requests_then_stop(app, monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "TRIM_EVERY_S", 0.05)
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    demo, url = app
    for i in range(5):
        _call(url, i)
    assert wait_until(lambda: len(trims) >= 1, 30)

    def settled() -> bool:  # no new trim over 20 periods: they stopped with the requests
        before = len(trims)
        time.sleep(1.0)
        return len(trims) == before

    assert wait_until(settled, 30)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_calls_glibc():
    assert memory.trim_heap() is True


def test_gradios_monitoring_routes_are_off(app):
    """Per-endpoint timings are not for anyone who asks (our own /metrics reports the service)."""
    _, url = app
    for path in ("monitoring/summary", "monitoring"):
        try:
            with urllib.request.urlopen(url + path, timeout=30) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status == 403, (path, status)
