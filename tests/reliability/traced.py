"""Run the batchrun CLI and write what happens inside it, as it happens, to an events file:
the test that started it counts events (engine steps, signals received) instead of seconds.

    python tests/reliability/traced.py EVENTS [pause=N,M...] [hang=MODULE:ATTR] -- batchrun args...

One line per event, appended unbuffered (a line written is in the file even if the process
is killed or leaves with os._exit):

    step RUNNING    after each fake-engine step: RUNNING requests still in flight in it
    pause           with pause=N,M...: the Nth (Mth, ...) step is over, and the engine waits
                    in it until the next signal comes (a test sends it then: the signal lands
                    inside an engine step, at a known point of the job, work in flight)
    signal N        the Nth SIGTERM/SIGINT reached batchrun's handler (before it acts)
    hang            the function MODULE:ATTR was called, and hangs: it never returns and
                    swallows every exception raised into it (a cleanup stuck in C code, a
                    join that never ends); only leaving the process ends it

Targets are looked up by name when the process starts, so the events follow the code if it
moves: change TARGETS below.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from typing import Any

TARGETS = {
    "step": "batchrun.engine.fake:FakeEngine.step",
    "signal": "batchrun.execute.stop:StopFlag.request",
}


def resolve(target: str) -> tuple[Any, str]:
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def arm(events: str, pauses: set[int], hang: str | None) -> None:
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def event(line: str) -> None:
        os.write(fd, f"{line}\n".encode())

    received = steps = 0
    owner, name = resolve(TARGETS["step"])
    real_step = getattr(owner, name)

    @functools.wraps(real_step)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        out = real_step(self, *args, **kwargs)
        steps += 1
        event(f"step {len(self._running)}")
        if steps in pauses:
            event("pause")
            waiting_for = received + 1
            while received < waiting_for:  # the handler runs in here, and may raise
                time.sleep(0.005)
        return out

    setattr(owner, name, step)

    owner, name = resolve(TARGETS["signal"])
    real_request = getattr(owner, name)

    @functools.wraps(real_request)
    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal received
        received += 1
        event(f"signal {received}")
        return real_request(self, *args, **kwargs)

    setattr(owner, name, request)

    if hang is not None:
        owner, name = resolve(hang)

        def hangs(*_: Any, **__: Any) -> None:
            event("hang")
            while True:
                try:
                    time.sleep(0.05)
                except BaseException:  # noqa: B036 - it hangs whatever is raised into it
                    pass

        setattr(owner, name, hangs)


def main() -> None:
    split = sys.argv.index("--")
    events, *options = sys.argv[1:split]
    given = dict(o.split("=", 1) for o in options)
    pauses = {int(n) for n in given.get("pause", "").split(",") if n}
    arm(events, pauses, given.get("hang"))
    from batchrun.cli import app

    app(sys.argv[split + 1:], prog_name="batchrun")


if __name__ == "__main__":
    main()
