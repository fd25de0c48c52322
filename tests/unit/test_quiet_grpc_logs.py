"""A client that goes away while grpc writes to it is one INFO line, not an ERROR with a
traceback (issue 13: "expected conditions log one line at the right level"). Seen with
grpcurl cut by -max-time during server reflection, whose handler is grpc's own."""

from __future__ import annotations

import json
import logging

from payment_grpc.grpc_private import ExecuteBatchError
from tests.helpers.logs import service_logging

GRPC_CORE = "grpc._cython.cygrpc"
METHOD = "[/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo]"


def _logged(emit: logging.Logger) -> list[dict[str, object]]:
    with service_logging() as output:
        try:
            raise ExecuteBatchError("Failed grpc_call_start_batch: 8")
        except ExecuteBatchError:
            emit.exception("ExecuteBatchError raised in core by servicer method %s", METHOD)
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_a_write_to_a_client_gone_is_one_info_line() -> None:
    (line,) = _logged(logging.getLogger(GRPC_CORE))
    assert line["level"] == "INFO"
    assert line["message"] == f"client went away mid-write; the call ends: {METHOD}"
    assert "exception" not in line


def test_other_loggers_keep_their_errors() -> None:
    (line,) = _logged(logging.getLogger("payment_grpc.anything"))
    assert line["level"] == "ERROR"
    assert "Traceback" in str(line["exception"])
