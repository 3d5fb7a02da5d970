"""SIGTERM / SIGUSR1: remember the signal; the loop saves a checkpoint at the next step boundary and exits.

Handlers only set a flag: saving from inside a signal handler would interleave with a collective.
"""

from __future__ import annotations

import signal
import time

_received: list[int] = []
# When this process started (near enough: the CLI imports this module first): train.stop_after_minutes
# counts data preparation and start-up too, which the scheduler's time limit also counts.
PROCESS_START = time.monotonic()


def _handler(signum: int, _frame) -> None:
    _received.append(signum)


def install() -> None:
    """Catch SIGTERM and SIGUSR1 in this process."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def pending() -> int:
    """The first signal received (0 if none): SIGUSR1 means preemption with requeue."""
    return _received[0] if _received else 0
