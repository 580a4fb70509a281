"""A request's suggestions while they are written: handed from the model thread to a reader.

The model thread publishes a snapshot after each step that changed a watched job, and when
the job ends; a reader blocks on the job's own condition until then, so a partial reaches
it as soon as its step is done, with no polling and without touching the scheduler's lock.
A reader slower than the steps sees only the newest snapshot (they coalesce; nothing queues).
Jobs nobody watches cost one flag test per step.
"""

from __future__ import annotations

import threading
from typing import Optional

from ..streaming import GrowOnly
from ..types import PartialSuggestion
from .autocomplete import settled_text


class Progress:
    def __init__(self):
        self._cond = threading.Condition()
        self.watched = False
        self._version = 0
        self._snapshot: tuple = ()
        self._closed = False
        self._grow = GrowOnly()

    def publish(self, snapshot: tuple) -> None:
        """(model thread) Make `snapshot` the newest, waking the reader if it differs."""
        with self._cond:
            snapshot = tuple(self._grow.apply(snapshot))
            if snapshot != self._snapshot:
                self._snapshot = snapshot
                self._version += 1
                self._cond.notify_all()

    def close(self) -> None:
        """(model thread) The job has ended: no snapshot follows."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, seen: int, timeout: Optional[float]) -> tuple[int, tuple, bool]:
        """Block until a snapshot newer than version `seen`, the end, or `timeout`:
        (version, snapshot, closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen or self._closed, timeout)
            return self._version, self._snapshot, self._closed


def snapshot(job) -> tuple:
    """The job's suggestions now, by row index; rows already dropped (duplicate or empty) are left out.

    An unfinished row shows only its settled text (autocomplete.settled_text), so what a reader
    is shown is not taken back by a stop rule later. A row's text is complete UTF-8 characters
    only (autocomplete.continuation), so no snapshot ends inside a character.
    """
    out = []
    for row in sorted(job.rows, key=lambda r: r.index):
        if row.kept is False:
            continue
        finished = row.finish is not None
        text = row.text if finished else settled_text(row.text, job.stop)
        out.append(PartialSuggestion(index=row.index, text=text, finished=finished, finish_reason=row.finish))
    return tuple(out)
