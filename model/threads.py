"""Where the engine's torch work runs: one long-lived thread, plus short-lived ones for setup.

With the OpenMP runtime of PyTorch's CPU builds, every thread that runs a parallel torch op
gets its own pool of worker threads, kept until that thread exits. Once a process holds
more pool threads than cores, every pool stops spinning between parallel regions and
sleeps instead, and a decode step (hundreds of short parallel regions) pays a wake-up
for each: on a 2-core machine that made each step a quarter slower. So the scheduler's
thread runs all of an engine's model work (`Scheduler.call`), and one-off setup such as
loading and packing runs in a thread that exits when it is done, taking its pool along.
"""

from __future__ import annotations

import threading


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
