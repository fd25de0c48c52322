"""Process-wide logging: one line per record, JSON or text."""

from __future__ import annotations

import json
import logging
import sys

from payment_grpc.grpc_private import ExecuteBatchError
from payment_grpc.pan_masking import STANDARD_RECORD_ATTRS, PanMaskingFilter


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The traceback; `exc_text` first: PanMaskingFilter leaves the masked one there."""
    if record.exc_text:
        return record.exc_text
    return formatter.formatException(record.exc_info) if record.exc_info else ""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in record.__dict__.items() if k not in STANDARD_RECORD_ATTRS},
        }
        exception = _exception_text(self, record)
        if exception:
            body["exception"] = exception
        return json.dumps(body, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in STANDARD_RECORD_ATTRS
        )
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        line = f"{line} {extras}" if extras else line
        exception = _exception_text(self, record)
        if exception:
            line += "\n" + exception
        return line


def json_logs(fmt: str) -> bool:
    """LOG_FORMAT: `json`, `text`, or `auto` (JSON unless stderr is a terminal, so a
    container's log collector gets JSON and a developer's shell gets text)."""
    if fmt == "auto":
        return not sys.stderr.isatty()
    return fmt == "json"


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs(fmt) else TextFormatter())
    handler.addFilter(PanMaskingFilter())  # every logger's records pass the root handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The Stripe SDK and httpx log every HTTP request at INFO (three lines per gateway
    # call); our gateway spans, metrics and errors already say what matters.
    for chatty in ("stripe", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("psycopg").addFilter(_expected_cancellation)
    logging.getLogger("grpc._cython.cygrpc").addFilter(_client_gone_mid_write)


def _expected_cancellation(record: logging.LogRecord) -> bool:
    """psycopg warns when a call cut at the end of the shutdown grace was inside a query;
    the server already says in one line how many calls the grace cut (api/server.py)."""
    return not str(record.msg).startswith("query cancellation interrupted")


def _client_gone_mid_write(record: logging.LogRecord) -> bool:
    """grpc logs an ERROR with a traceback when a handler's write fails because its client
    went away (ExecuteBatchError: a cancelled or disconnected stream, a grpcurl cut by
    -max-time during server reflection). That is an expected condition, not a fault of
    ours: one INFO line naming the method instead (issue 13; our own streams say it
    themselves, api/servicer.py)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, ExecuteBatchError):
        method = str(record.getMessage()).rpartition(" ")[2]
        record.msg, record.args = "client went away mid-write; the call ends: %s", (method,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
    return True
