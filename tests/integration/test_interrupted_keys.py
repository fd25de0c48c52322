"""An interrupted call never leaves its idempotency key held behind it (issue 13).

A storm of Charges with 5-200 ms deadlines through the real grpc.aio server and the
generated stub: some are cut before their claim, some while it commits, some in the
middle of the use case. Once the server has no call in flight any more (their clean-up
included), a retry of every key runs or resumes at once, never ABORTED
IDEMPOTENCY_KEY_IN_USE, and every key still charges exactly once.
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import uuid

import grpc
from payments.v1 import payment_service_pb2 as api

from tests.conftest import make_settings
from tests.e2e.server_process import ledger_authorizations
from tests.helpers.builders import S, charge_request, keyed
from tests.helpers.calls import RichError
from tests.helpers.servers import serving

DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
STORM = 300
WAVE = 30  # calls sent at once: enough that the server runs them while the deadlines hit
DEADLINES_S = (0.005, 0.2)
RETRIES_AT_ONCE = 8
ATTEMPTS = 5  # UNAVAILABLE (a busy SQLite writer lock) is retried, like clients do


async def test_a_retry_right_after_a_deadline_runs_or_resumes(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(
        database_url, tmp_path, gateway_latency_ms_min=0, gateway_latency_ms_max=50
    )
    async with serving(settings) as (app, stub):
        rng = random.Random(13)
        requests = {uuid.uuid4().hex: charge_request() for _ in range(STORM)}
        keys = list(requests)
        interrupted = []
        for start in range(0, STORM, WAVE):
            interrupted += await asyncio.gather(
                *(
                    stub.Charge(
                        requests[key], metadata=keyed(key), timeout=rng.uniform(*DEADLINES_S)
                    )
                    for key in keys[start : start + WAVE]
                ),
                return_exceptions=True,
            )
        cut = [a for a in interrupted if isinstance(a, grpc.aio.AioRpcError)]
        # (UNAVAILABLE: the database was busier than its lock timeout; retried below)
        assert {a.code() for a in cut} <= {DEADLINE, grpc.StatusCode.UNAVAILABLE}
        assert any(a.code() == DEADLINE for a in cut), "no deadline cut a call"
        await app.server.metrics.idle()  # every cut call has ended on the server too
        # ... and so has its clean-up: a cut call's release runs on after its handler
        # (shielded), so the handler's end alone does not mean the key is free yet.
        await app.keys.settle(timeout_s=60)

        gate = asyncio.Semaphore(RETRIES_AT_ONCE)

        async def retry(key: str) -> api.ChargeResponse | RichError:
            async with gate:
                for _ in range(ATTEMPTS):
                    try:
                        answer: api.ChargeResponse = await stub.Charge(
                            requests[key], metadata=keyed(key), timeout=60
                        )
                    except grpc.aio.AioRpcError as error:
                        refusal = RichError(error)
                        if refusal.code != grpc.StatusCode.UNAVAILABLE:
                            return refusal
                    else:
                        return answer
                return refusal

        answers = dict(zip(requests, await asyncio.gather(*map(retry, requests)), strict=True))
        refused = {
            k: (a.code, a.info.reason) for k, a in answers.items() if isinstance(a, RichError)
        }
        assert refused == {}  # above all: no IDEMPOTENCY_KEY_IN_USE
        charged = [a for a in answers.values() if isinstance(a, api.ChargeResponse)]
        assert {a.payment.status for a in charged} <= {
            S.PAYMENT_STATUS_CAPTURED,
            S.PAYMENT_STATUS_PROCESSING,  # the gateway's answer was lost (its failure mix)
            S.PAYMENT_STATUS_FAILED,
        }
        payment_ids = {a.payment.payment_id for a in charged}
        assert len(payment_ids) == STORM  # one payment per key
        authorized = ledger_authorizations(app.settings.ledger_path())
        assert set(authorized) <= payment_ids
        assert set(authorized.values()) <= {1}  # never charged twice
