"""Crash-test fault points. With FAULT_POINT set, the process kills itself with SIGKILL
when execution reaches that phase boundary: no clean-up, exactly like a crash."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class NoFaults:
    def hit(self, point: str) -> None:
        return None


class KillAtFaultPoint:
    def __init__(self, point: str) -> None:
        self._point = point

    def hit(self, point: str) -> None:
        if point == self._point:
            log.critical("fault point %s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)
