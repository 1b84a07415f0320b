"""How a running job stops: SIGTERM / SIGINT, the stop flag the executor polls, and the
exception a second signal raises.

A first signal asks the job to stop admitting and let the requests in flight finish (the
executor drains for its grace period); a second one raises Interrupted wherever the main
thread is; a third one, while cleaning up after the second takes too long, ends the process
at once. Every finished row is in the checkpoint's journal by then, so each way is resumable.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from ..errors import EXIT_INTERRUPTED
from ..execute.stop import StopFlag
from .terminal import terminal_fd

_ABANDON = ("batchrun: third signal: exiting now; finished rows are saved, "
            "run again with --resume\n")


class Interrupted(BaseException):
    """The job was stopped by a signal; its checkpoint is resumable.

    A BaseException, like KeyboardInterrupt: it is raised from a signal handler wherever the
    main thread happens to be, often inside vLLM, whose `except Exception` handlers would
    otherwise turn it into an engine failure (or swallow it)."""


def _say(message: str) -> None:
    # os.write, not print or logging: a handler may run while the main thread is inside
    # either. A closed stderr must not turn a signal into a write error.
    with contextlib.suppress(OSError):
        os.write(terminal_fd(), message.encode())


def install_signal_handlers(stop: StopFlag) -> Callable[[], None]:
    """SIGTERM / SIGINT: the first one drains gracefully, the second one raises Interrupted
    now, a third one (cleanup after the second is taking too long) exits the process at once.
    Returns a function that restores the previous handlers."""

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not stop.request():
            _say(f"batchrun: {name}: finishing requests in flight, then saving; send it again "
                 "to stop at once\n")
            return
        if stop.signals > 2:
            # Every finished row is already in the journal, flushed and readable after a
            # kill, so leaving without any cleanup loses nothing.
            _say(_ABANDON)
            os._exit(EXIT_INTERRUPTED)
        raise Interrupted(f"second {name}: stopped at once")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]
