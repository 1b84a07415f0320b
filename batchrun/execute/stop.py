"""A request to stop, polled by whatever runs work: the executor, the replicas' dispatch.
Signal handlers (job/signals.py) set it; a replica's own stop() sets it too."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class StopFlag:
    """Set by the first SIGTERM/SIGINT: stop admitting; the second one aborts at once."""

    requested: bool = False
    at: float = 0.0
    signals: int = 0  # how many stop requests came in
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self) -> bool:
        """Return True if this was the second request (hard stop)."""
        with self._lock:
            self.signals += 1
            if self.requested:
                return True
            self.requested, self.at = True, time.monotonic()
            return False
