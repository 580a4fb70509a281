"""Where the engine's torch work runs: one long-lived thread, plus short-lived ones for setup.

With the OpenMP runtime of PyTorch's CPU builds, every thread that runs a parallel torch op
gets its own pool of worker threads, kept until that thread exits. Once a process holds
more pool threads than cores, every pool stops spinning between parallel regions and
sleeps instead, and a decode step (hundreds of short parallel regions) pays a wake-up
for each (the README gives what that cost on a 2-core machine). So one ModelThread
runs the batching loops of all CPU engines of a process in turn, and all of their model
work (`Scheduler.call`); one-off setup such as loading and packing runs in a thread that
exits when it is done, taking its pool along.

At interpreter exit every model thread is stopped and joined before the runtime tears down:
a thread still inside torch then would abort the process ("terminate called without an
active exception") and turn a successful run into exit status 134.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Optional

import torch

log = logging.getLogger(__name__)


class ModelThread:
    """A thread that gives each of its schedulers a turn (one batching step) while any has work."""

    def __init__(self, name: str = "wwt-model"):
        self.cond = threading.Condition()
        self.schedulers: list = []
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()
        _all.append(self)

    def add(self, scheduler) -> None:
        with self.cond:
            self.schedulers.append(scheduler)
            self.cond.notify_all()

    def remove(self, scheduler) -> None:
        with self.cond:
            if scheduler in self.schedulers:
                self.schedulers.remove(scheduler)

    def stop(self, timeout: float = 10.0) -> None:
        """Close every scheduler on this thread (their waiting requests are cancelled), then end it."""
        with self.cond:
            schedulers = list(self.schedulers)
        for scheduler in schedulers:
            scheduler.close()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(torch.get_num_threads())  # this thread's OpenMP pool as configured
        while True:
            with self.cond:
                ready = [s for s in self.schedulers if s.has_work()]
                while not ready and not self.stopping:
                    self.cond.wait()
                    ready = [s for s in self.schedulers if s.has_work()]
                if self.stopping and not ready:
                    return
            for scheduler in ready:
                try:
                    scheduler.turn()
                except Exception:  # a scheduler handles its own errors; this is the last guard
                    log.exception("a scheduler's turn failed")


_shared: Optional[ModelThread] = None
_shared_lock = threading.Lock()
_all: list[ModelThread] = []


@atexit.register
def stop_all() -> None:
    """Stop every model thread of the process (run at interpreter exit)."""
    for worker in list(_all):
        worker.stop()


def model_thread(device: torch.device) -> ModelThread:
    """The process's one CPU model thread (made on first use); a GPU engine gets a thread of its own,
    so engines on different GPUs keep overlapping."""
    global _shared
    if device.type != "cpu":
        return ModelThread(f"wwt-model-{device}")
    with _shared_lock:
        if _shared is None:
            _shared = ModelThread()
        return _shared


def in_fresh_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread of its own that exits afterwards; its result or its exception."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, name="wwt-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")
