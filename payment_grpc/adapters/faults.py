"""Crash-test fault points. With FAULT_POINT set, the process kills itself with SIGKILL
when execution reaches that phase boundary: no clean-up, exactly like a crash.

Every money-moving operation has the same three boundaries: after the transaction that
records the intent and before the gateway call, after the gateway answered and before
the outcome is committed, and after that commit before the response is sent.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

OPERATIONS = ("charge", "capture", "cancel", "refund")
PHASES = ("before_gateway", "after_gateway", "after_commit")
FAULT_POINTS = frozenset(f"{operation}.{phase}" for operation in OPERATIONS for phase in PHASES)


class NoFaults:
    def hit(self, point: str) -> None:
        return None


class KillAtFaultPoint:
    def __init__(self, point: str) -> None:
        # A misspelt point would never fire: refuse to start rather than run uncrashed.
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r}; one of {sorted(FAULT_POINTS)}")
        self._point = point

    def hit(self, point: str) -> None:
        if point == self._point:
            log.critical("fault point %s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)
