"""Run the batchrun CLI and SIGKILL it at an exact point: `kill -9` at the worst moment, on
purpose.

    python tests/reliability/kill_at.py MODULE:ATTR [after] [nth=N] -- batchrun args...

The process kills itself when the function MODULE.ATTR is called for the Nth time (default 1),
before the call runs, or right after it returns with `after`. E.g.
`batchrun.io.output.checkpoint:Checkpoint.remove` kills a run after its output was renamed
into place but before its checkpoint is removed.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any


def arm(target: str, after: bool, nth: int) -> None:
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    calls = 0

    @functools.wraps(real)
    def killing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, killing)


def main() -> None:
    split = sys.argv.index("--")
    target, *options = sys.argv[1:split]
    nth = next((int(o.split("=")[1]) for o in options if o.startswith("nth=")), 1)
    arm(target, "after" in options, nth)
    from batchrun.cli import app

    app(sys.argv[split + 1:], prog_name="batchrun")


if __name__ == "__main__":
    main()
