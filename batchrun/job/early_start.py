"""Engines busy from the first minute: read the job on a thread of its own and hand the
engine a run of rows whenever it would otherwise wait.

A job larger than one sorted run (ingest/shards.py) is read on a background thread. Each
time a run of rows fills while the engine has nothing to do (at the start, or having
finished the rows handed before), that run goes to the engine unsorted, as a shard of its
own (`EarlyRows`), instead of being spilled for the global plan. Runs that fill while the
engine is busy are spilled as before, and once the read ends they are cut into prefix shards
and planned together.

What it costs: the rows run early are planned among themselves, so a prefix they share
with rows read later is computed once more (at most once per early run), identical prompts
on either side are run once each, and their decode-heavy rows are started first within the
run only. The engine starts before the job's longest request is known, so it is sized for
the model's whole context (engine_setup.engine_sizing). `--no-early-start` reads and plans
the whole job first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..ingest.stream import EarlyRows, ShardedJob

Read = Callable[[Callable[[EarlyRows], bool], Callable[[], bool], threading.Lock], ShardedJob]


def start_read(read: Callable[..., ShardedJob], *, stop: Callable[[], bool], early: bool,
               ) -> tuple[BackgroundRead | None, EarlyRows | None, ShardedJob | None]:
    """Begin reading the job with `read` (ingest.stream.read_into_shards less its
    `hand_on` and `stop`): with `early`, on a thread, until its first run of rows is handed
    on (the reader, those rows, None) or the whole read has ended (the reader, None, the
    job); else here, to its end (None, None, the job)."""
    if not early:
        return None, None, read(stop=stop)
    reader = BackgroundRead(lambda hand_on, abandoned, planning: read(
        hand_on=hand_on, stop=lambda: stop() or abandoned(), planning=planning))
    try:
        rows = reader.next_rows()
        return reader, rows, reader.result() if rows is None else None
    except BaseException:
        reader.abandon()
        raise


class BackgroundRead:
    """`read(hand_on, abandoned, planning)` (ingest.stream.read_into_shards) on a thread:
    `next_rows` gives the engine each run it asks for, `result` the sharded rest of the job.
    `planning` is held by the read while it sorts a run, and by the engine's thread while
    it prepares rows to run: one at a time, so that their memory peaks never add up."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self.planning = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wanted = True  # the engine waits for rows: the next full run is its
        self._handed: EarlyRows | None = None
        self._done = False
        self._abandoned = False
        self._result: ShardedJob | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="batchrun-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._read(self._take, lambda: self._abandoned, self.planning)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def _take(self, rows: EarlyRows) -> bool:
        """The reader's offer of a full run: taken only while the engine waits for one."""
        with self._changed:
            if not self._wanted or self._abandoned:
                return False
            self._wanted, self._handed = False, rows
            self._changed.notify_all()
            return True

    def next_rows(self) -> EarlyRows | None:
        """The next run of rows for the engine, once one fills; None once the read has
        ended (the rest is in `result()`). Waits in short slices so that a signal's handler
        runs meanwhile."""
        with self._changed:
            self._wanted = self._handed is None
            while self._handed is None and not self._done:
                self._changed.wait(0.2)
            rows, self._handed = self._handed, None
            self._wanted = False
            return rows

    def result(self) -> ShardedJob:
        """The job read to its end (less the runs handed on), or what the read raised."""
        while self._thread.is_alive():
            self._thread.join(0.2)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def abandon(self) -> None:
        """Stop reading at the next batch (the job ends early) and let the thread go."""
        with self._changed:
            self._abandoned = True
            self._changed.notify_all()
