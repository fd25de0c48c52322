"""The service's own logging in a test: `configure_logging`, its stream swapped for a
buffer, and the root logger's handlers and level put back afterwards."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from payment_grpc.logging_setup import configure_logging


@contextmanager
def service_logging(level: str = "INFO", fmt: str = "json") -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    output = io.StringIO()
    try:
        configure_logging(level, fmt)
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(output)
        yield output
    finally:
        root.handlers[:] = saved
        root.setLevel(saved_level)
