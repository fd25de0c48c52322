"""The simulator engine: the decisions and the ledger of a realistic payment gateway.

One engine behind two faces: the in-process simulated gateway (the embedded default,
`simulated.py`) and the Stripe-compatible HTTP simulator (`stripe_simulator.py`).

Stripe-style test tokens give fixed outcomes; any other token is decided by a seedable
RNG with a configurable success rate and failure mix. The ledger lives in its own SQLite
file (outside the service's memory), every call is idempotent by key, and UPI, net
banking and PayPal settle later: the engine tells its settlement listener when.
The ledger's own errors (sqlite3) are the simulated gateway's failures: they leave
through `_ledger_errors`, mapped to the GatewayError family, never raw.

The ledger is off the event loop: its connection lives on one thread of its own
(`_LedgerThread`), and each operation (an authorization with its lookup, decision and
record; a follow-up's check and record) goes there whole, in one hop, never a hop per
statement. Operations that arrive while the thread is busy go together in its next batch:
one transaction, one COMMIT and one wake-up of the event loop for all of them (group
commit), while a lone operation starts at once. Every answer is written to the ledger
file before it is given, so the ledger survives a SIGKILL of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from payment_grpc.adapters.gateways.failure_mix import FailureMix
from payment_grpc.domain.money import Money
from payment_grpc.domain.payment import (
    ASYNC_METHOD_TYPES,
    CardDetails,
    Failure,
    PaymentMethodType,
)
from payment_grpc.service.ports import (
    Authorization,
    AuthorizationOutcome,
    AuthorizationRequest,
    GatewayResult,
    GatewayTimeout,
    GatewayUnreachable,
)

log = logging.getLogger(__name__)


def _fingerprint(token: str) -> str:
    """Like a real gateway's card fingerprint: stable per card, reveals nothing of it."""
    return hashlib.sha256(f"simulated-card:{token}".encode()).hexdigest()[:16]


APPROVED_CARDS = {
    token: CardDetails(brand, last4, 12, 2034, _fingerprint(token))
    for token, brand, last4 in (
        ("tok_visa", "visa", "4242"),
        ("tok_mastercard", "mastercard", "4444"),
        ("tok_amex", "amex", "8431"),
    )
}
DECLINES = {
    "tok_chargeDeclined": Failure("card_declined", "Your card was declined.", "generic_decline"),
    "tok_chargeDeclinedInsufficientFunds": Failure(
        "card_declined", "Your card has insufficient funds.", "insufficient_funds"
    ),
    "tok_chargeDeclinedExpiredCard": Failure(
        "expired_card", "Your card has expired.", "expired_card"
    ),
    "tok_chargeDeclinedProcessingError": Failure(
        "processing_error", "An error occurred while processing your card. Try again.", ""
    ),
}
RANDOM_DECLINE = Failure("card_declined", "Your card was declined.", "generic_decline")
RANDOM_INSUFFICIENT = DECLINES["tok_chargeDeclinedInsufficientFunds"]
INVALID_METHOD = Failure("invalid_payment_method", "The payment method is invalid.", "")
GENERIC_CARD = CardDetails("visa", "0000", 12, 2034)


@dataclass(frozen=True, slots=True)
class SimulatedGatewayConfig:
    ledger_path: str
    success_rate: float = 0.95
    failure_mix: FailureMix = field(default_factory=FailureMix)
    latency_ms_min: int = 0
    latency_ms_max: int = 0
    async_settle_ms: int = 2000
    seed: int | None = None

    @classmethod
    def from_knobs(cls, ledger_path: str, knobs: object) -> SimulatedGatewayConfig:
        """The other fields read by name from `knobs`: the GATEWAY_* settings or
        gateway-sim's flags, named alike so that a knob added here is taken from both."""
        names = (knob.name for knob in fields(cls) if knob.name != "ledger_path")
        return cls(ledger_path, **{name: getattr(knobs, name) for name in names})


_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payment_id TEXT NOT NULL,
    reference TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    result TEXT NOT NULL,
    settle_at TEXT,
    created_at TEXT NOT NULL
)
"""


# Follow-ups and views look charges up by reference and by payment id.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ledger_reference ON ledger (reference)",
    "CREATE INDEX IF NOT EXISTS ledger_payment_id ON ledger (payment_id)",
)


def _open_ledger(path: str) -> sqlite3.Connection:
    """Opens the ledger; runs on the ledger's thread, the only one that uses the connection."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # Under WAL, NORMAL syncs at checkpoints rather than at every commit: a power cut may
        # lose the last writes of a simulator, never corrupt its ledger (a killed process
        # loses nothing: a committed write is in the file).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(ledger)")}
        if {"reference", "payment_id"} <= columns:  # a ledger of another shape is left as it is
            for index in _INDEXES:
                db.execute(index)
        db.row_factory = sqlite3.Row
    except BaseException:
        db.close()
        raise
    return db


T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]


class _MaybeWritten(Exception):
    """An operation's write failed after it started: it may or may not have landed."""


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """Around an operation's write and what follows it: a failure there is an unknown
    outcome (GatewayTimeout), not a failed read."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _MaybeWritten from exc


@contextlib.contextmanager
def _atomic(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction around a check and the write that depends on it, unless the
    operation already runs inside its batch's transaction (which then covers it)."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")  # the write lock first: no read snapshot to go stale
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclass(slots=True)
class _Work:
    run: Operation[Any]
    writes: bool
    answer: asyncio.Future[Any]


class _LedgerThread:
    """The ledger's SQLite connection on one thread (a one-worker executor) and the batches
    of operations sent to it. The event loop never waits on SQLite: it queues an operation
    and awaits its answer; one batch runs at a time, and what queued meanwhile is the next."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None  # used on the ledger's thread only
        self._executor: ThreadPoolExecutor | None = None
        self._queued: list[_Work] = []
        self._running: asyncio.Future[list[tuple[bool, Any]]] | None = None

    async def run(self, operation: Operation[T], *, writes: bool) -> T:
        """`operation(connection)` on the ledger's thread; `writes` when it may write (a
        failed batch COMMIT is then an unknown outcome for it)."""
        loop = asyncio.get_running_loop()
        work = _Work(operation, writes, loop.create_future())
        self._queued.append(work)
        if self._running is None:
            self._start(loop)
        result: T = await work.answer
        return result

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queued = self._queued, []
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-ledger")
        running = loop.run_in_executor(self._executor, self._run_batch, batch)
        self._running = running
        running.add_done_callback(lambda done: self._answer(loop, batch, done))

    def _answer(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Work],
        done: asyncio.Future[list[tuple[bool, Any]]],
    ) -> None:
        self._running = None
        if self._queued:
            self._start(loop)  # before answering: the thread never waits for the loop
        if done.cancelled():
            outcomes: list[tuple[bool, Any]] = [(False, asyncio.CancelledError())] * len(batch)
        elif (failure := done.exception()) is not None:
            outcomes = [(False, failure)] * len(batch)
        else:
            outcomes = done.result()
        for work, (ok, value) in zip(batch, outcomes, strict=True):
            if work.answer.done():  # its caller was cancelled; the work was done all the same
                continue
            if ok:
                work.answer.set_result(value)
            else:
                work.answer.set_exception(value)

    def _run_batch(self, batch: list[_Work]) -> list[tuple[bool, Any]]:
        """On the ledger's thread: the batch's operations, in one transaction when more than
        one of them writes. (ok, result or exception) per operation, in order."""
        try:
            if self._db is None:
                self._db = _open_ledger(self._path)
            db = self._db
            together = sum(work.writes for work in batch) > 1
            if together:
                db.execute("BEGIN IMMEDIATE")
        except Exception as exc:  # nothing was written
            return [(False, exc)] * len(batch)
        outcomes: list[tuple[bool, Any]] = []
        for work in batch:
            try:
                outcomes.append((True, work.run(db)))
            except Exception as exc:  # a failed statement undoes itself, not the others
                outcomes.append((False, exc))
        if together:
            try:
                if not db.in_transaction:  # a severe error rolled the whole batch back
                    raise sqlite3.OperationalError("the batch's transaction was rolled back")
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                return [(False, _lost(exc) if work.writes else exc) for work in batch]
        return outcomes

    async def close(self) -> None:
        while self._running is not None:
            await asyncio.wait([self._running])
            await asyncio.sleep(0)  # its answers, and a next batch started by them
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close_db)
        executor.shutdown(wait=True)  # its one thread has nothing left to do: ends at once

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


def _lost(exc: sqlite3.Error) -> _MaybeWritten:
    lost = _MaybeWritten()
    lost.__cause__ = exc
    return lost


@contextlib.contextmanager
def _ledger_errors() -> Iterator[None]:
    """The one place the ledger's errors become gateway errors. A failed read changed
    nothing (unreachable: retry); a failed write may or may not have landed (timeout:
    the outcome is unknown, so it is looked up or repeated with the same key)."""
    try:
        yield
    except _MaybeWritten as lost:
        cause = lost.__cause__
        raise GatewayTimeout(f"simulated gateway ledger failed: {type(cause).__name__}") from cause
    except sqlite3.Error as exc:
        raise GatewayUnreachable(f"simulated gateway ledger failed: {type(exc).__name__}") from exc


SettlementListener = Callable[[str, str, Authorization], Awaitable[None]]
"""Called with (payment id, authorization key, final authorization) once an
asynchronous authorization settles."""


@dataclass(frozen=True, slots=True)
class LedgerRefund:
    reference: str
    key: str
    amount_minor: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChargeView:
    """Everything the gateway knows about one authorization, as of now."""

    key: str
    payment_id: str
    reference: str
    amount: Money
    authorization: Authorization  # PENDING until an asynchronous method settles
    captured_minor: int
    voided: bool
    refunds: tuple[LedgerRefund, ...]
    created_at: datetime

    @property
    def refunded_minor(self) -> int:
        return sum(refund.amount_minor for refund in self.refunds)


class SimulatorEngine:
    def __init__(self, config: SimulatedGatewayConfig, reference_prefix: str = "ch_sim") -> None:
        self._config = config
        self._prefix = reference_prefix
        self._rng = random.Random(config.seed)
        self._ledger = _LedgerThread(config.ledger_path)
        self._listener: SettlementListener | None = None
        self._timers: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> SimulatedGatewayConfig:
        return self._config

    # ---------------------------------------------------------------- lifecycle

    async def _run(self, operation: Operation[T], *, writes: bool = False) -> T:
        """`operation(connection)` on the ledger's thread, its errors as gateway errors."""
        with _ledger_errors():
            return await self._ledger.run(operation, writes=writes)

    async def _query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return await self._run(lambda db: [dict(row) for row in db.execute(sql, parameters)])

    def on_settled(self, listener: SettlementListener) -> None:
        self._listener = listener

    async def settlements_done(self) -> None:
        """Return once every scheduled settlement has happened (tests await this)."""
        while self._timers:
            await asyncio.gather(*list(self._timers), return_exceptions=True)

    async def healthy(self) -> bool:
        await self._query("SELECT 1")
        return True

    async def close(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        await self._ledger.close()

    # ---------------------------------------------------------------- operations

    async def authorize(self, request: AuthorizationRequest) -> Authorization:
        """Raises GatewayTimeout when the simulated network loses the response (the
        gateway did record the authorization: a retry with the same key finds it)."""
        await self.latency()
        stored, new, lost = await self._run(lambda db: self._authorize_in(db, request), writes=True)
        if lost:
            raise GatewayTimeout("simulated network error: the response was lost")
        result = await self._settled(stored)
        if new and result.outcome is AuthorizationOutcome.PENDING:
            self._schedule_settlement(request.payment_id, request.idempotency_key)
        return result

    def _authorize_in(
        self, db: sqlite3.Connection, request: AuthorizationRequest
    ) -> tuple[dict[str, Any], bool, bool]:
        """On the ledger's thread: (the stored row, whether it was decided now, whether
        its response is lost). A key already there keeps its first answer."""
        stored = _find(db, request.idempotency_key)
        if stored is not None:
            return stored, False, False
        authorization, settle_at, lost = self._decide(request)
        stored = _authorization_row(request, authorization, settle_at)
        with _writing():
            if db.execute(_INSERT_AUTHORIZATION, stored).rowcount != 1:
                # A concurrent duplicate (another process, same key) recorded its own first.
                found = _find(db, request.idempotency_key)
                assert found is not None
                stored = found
        return stored, True, lost

    async def lookup(self, idempotency_key: str) -> Authorization | None:
        stored = await self._find(idempotency_key)
        return None if stored is None else await self._settled(stored)

    async def capture(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self._follow_up("capture", reference, amount, idempotency_key)

    async def void(self, reference: str, idempotency_key: str) -> GatewayResult:
        return await self._follow_up("void", reference, None, idempotency_key)

    async def refund(self, reference: str, amount: Money, idempotency_key: str) -> GatewayResult:
        return await self._follow_up("refund", reference, amount, idempotency_key)

    async def latency(self) -> None:
        low, high = self._config.latency_ms_min, self._config.latency_ms_max
        if high > 0:
            await asyncio.sleep(self._rng.uniform(low, max(low, high)) / 1000)

    # ---------------------------------------------------------------- views

    async def charge(self, reference: str) -> ChargeView | None:
        """The authorization with this gateway reference, with its follow-ups."""
        rows = await self._query(
            "SELECT * FROM ledger WHERE kind = 'authorize' AND reference = ?", (reference,)
        )
        return await self._view(dict(rows[0])) if rows else None

    async def charges_of_payment(self, payment_id: str) -> list[ChargeView]:
        rows = await self._query(
            "SELECT * FROM ledger WHERE kind = 'authorize' AND payment_id = ? ORDER BY created_at",
            (payment_id,),
        )
        return [await self._view(dict(row)) for row in rows]

    async def charges_between(self, since: datetime, until: datetime) -> list[ChargeView]:
        """Authorizations recorded in [since, until), oldest first (for reconciliation)."""
        rows = await self._query(
            "SELECT * FROM ledger WHERE kind = 'authorize' AND created_at >= ?"
            " AND created_at < ? ORDER BY created_at",
            (since.isoformat(), until.isoformat()),
        )
        return [await self._view(dict(row)) for row in rows]

    async def refund_record(self, reference: str) -> tuple[str, LedgerRefund] | None:
        """(charge reference, refund) of the refund with this gateway reference."""
        rows = await self._query(
            "SELECT * FROM ledger WHERE kind = 'refund' AND reference = ?", (reference,)
        )
        if not rows or not json.loads(rows[0]["result"])["succeeded"]:
            return None
        row = dict(rows[0])
        return row["payment_id"], _ledger_refund(row)

    async def _view(self, row: dict[str, Any]) -> ChargeView:
        follow_ups = [
            dict(r)
            for r in await self._query(
                "SELECT * FROM ledger WHERE payment_id = ? AND kind != 'authorize'"
                " ORDER BY created_at",
                (row["reference"],),
            )
            if json.loads(r["result"])["succeeded"]
        ]
        authorization = await self._settled(row)
        amount = Money(row["currency"], row["amount_minor"])
        captures = [r["amount_minor"] for r in follow_ups if r["kind"] == "capture"]
        captured_now = authorization.outcome is AuthorizationOutcome.CAPTURED
        captured = amount.amount_minor if captured_now else 0
        return ChargeView(
            key=row["key"],
            payment_id=row["payment_id"],
            reference=row["reference"],
            amount=amount,
            authorization=authorization,
            captured_minor=captures[0] if captures else captured,
            voided=any(r["kind"] == "void" for r in follow_ups),
            refunds=tuple(_ledger_refund(r) for r in follow_ups if r["kind"] == "refund"),
            created_at=datetime.fromisoformat(row["created_at"]),
        )

    # ---------------------------------------------------------------- decisions

    def _decide(self, request: AuthorizationRequest) -> tuple[Authorization, datetime | None, bool]:
        reference = f"{self._prefix}_{uuid.uuid4().hex}"
        method = request.method
        success = (
            AuthorizationOutcome.CAPTURED if request.capture else AuthorizationOutcome.AUTHORIZED
        )
        if method.type is PaymentMethodType.COD:
            return Authorization(AuthorizationOutcome.AUTHORIZED, reference), None, False
        if method.type is PaymentMethodType.CARD and method.token in APPROVED_CARDS:
            return Authorization(success, reference, APPROVED_CARDS[method.token]), None, False
        if method.type is PaymentMethodType.CARD and method.token in DECLINES:
            failure = DECLINES[method.token]
            return (
                Authorization(AuthorizationOutcome.DECLINED, reference, failure=failure),
                None,
                False,
            )
        succeeded, rolled_failure, lost = self._roll()
        card = None
        if method.type is PaymentMethodType.CARD:
            card = replace(GENERIC_CARD, fingerprint=_fingerprint(method.token))
        final = Authorization(
            success if succeeded else AuthorizationOutcome.DECLINED, reference, card, rolled_failure
        )
        if method.type in ASYNC_METHOD_TYPES:
            delay = timedelta(milliseconds=self._config.async_settle_ms)
            return final, datetime.now(UTC) + delay, False
        return final, None, lost

    def _roll(self) -> tuple[bool, Failure | None, bool]:
        """(succeeded, failure, response lost) for a token without a fixed outcome."""
        if self._rng.random() < self._config.success_rate:
            return True, None, False
        mix = self._config.failure_mix
        kind = self._rng.choices(
            ["declined", "insufficient", "network", "invalid"],
            weights=[mix.declined, mix.insufficient_funds, mix.network_error, mix.invalid_method],
        )[0]
        if kind == "network":
            return True, None, True  # the gateway charged, but we never hear back
        failure = {"declined": RANDOM_DECLINE, "insufficient": RANDOM_INSUFFICIENT}.get(
            kind, INVALID_METHOD
        )
        return False, failure, False

    # ---------------------------------------------------------------- asynchronous methods

    def _schedule_settlement(self, payment_id: str, key: str) -> None:
        task = asyncio.create_task(self._settle_later(payment_id, key))
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    async def _settle_later(self, payment_id: str, key: str) -> None:
        await asyncio.sleep(self._config.async_settle_ms / 1000)
        stored = await self._find(key)
        if stored is None or self._listener is None:
            return
        try:
            await self._listener(payment_id, key, await self._settled(stored))
        except Exception:
            log.exception("settlement listener failed for %s; recovery will retry", payment_id)

    async def _settled(self, row: dict[str, Any]) -> Authorization:
        """The stored authorization; still PENDING until its settle time has passed."""
        settle_at = row["settle_at"]
        if settle_at and datetime.fromisoformat(settle_at) > datetime.now(UTC):
            return Authorization(AuthorizationOutcome.PENDING, row["reference"])
        return _authorization(row)

    # ---------------------------------------------------------------- ledger

    async def _find(self, key: str) -> dict[str, Any] | None:
        return await self._run(lambda db: _find(db, key))

    async def _follow_up(
        self, kind: str, reference: str, amount: Money | None, key: str
    ) -> GatewayResult:
        await self.latency()
        return await self._run(
            lambda db: _follow_up_in(db, kind, reference, amount, key), writes=True
        )

    async def authorization_count(self) -> int:
        """Authorizations that reached the gateway (for tests and benchmarks)."""
        sql = "SELECT COUNT(*) FROM ledger WHERE kind = 'authorize'"
        return await self._run(lambda db: int(db.execute(sql).fetchone()[0]))


def _find(db: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = db.execute("SELECT * FROM ledger WHERE key = ?", (key,)).fetchone()
    return None if row is None else dict(row)


def _follow_up_in(
    db: sqlite3.Connection, kind: str, reference: str, amount: Money | None, key: str
) -> GatewayResult:
    """On the ledger's thread: the answer already recorded under this key, or the charge's
    state checked and the answer recorded in one write transaction, so two refunds racing
    from two replicas can never take more than was captured."""
    stored = _find(db, key)
    if stored is not None:
        return _result(json.loads(stored["result"]))
    with _writing(), _atomic(db):
        rows = db.execute(
            "SELECT kind, result, amount_minor FROM ledger WHERE reference = ? OR payment_id = ?",
            (reference, reference),
        ).fetchall()
        result = _follow_up_result(kind, [(r[0], json.loads(r[1]), r[2]) for r in rows], amount)
        inserted = db.execute(
            "INSERT OR IGNORE INTO ledger (key, kind, payment_id, reference,"
            " amount_minor, currency, result, settle_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (
                key,
                kind,
                reference,
                result.reference,
                amount.amount_minor if amount else 0,
                amount.currency if amount else "",
                json.dumps(_result_json(result)),
                datetime.now(UTC).isoformat(),
            ),
        ).rowcount
        if inserted != 1:  # a concurrent call with the same key recorded its answer first
            stored = _find(db, key)
            assert stored is not None
            return _result(json.loads(stored["result"]))
    return result


REQUIRED_STATUS = {"capture": "AUTHORIZED", "void": "AUTHORIZED", "refund": "CAPTURED"}


def _follow_up_result(
    kind: str, rows: list[tuple[str, dict[str, Any], int]], amount: Money | None
) -> GatewayResult:
    required = REQUIRED_STATUS[kind]
    status = _charge_status([(k, r) for k, r, _ in rows])
    if status != required and not (kind == "refund" and status == "AUTHORIZED_CAPTURED"):
        return GatewayResult(False, failure=Failure("charge_not_" + required.lower(), ""))
    if amount is not None and amount.amount_minor > _room(kind, rows):
        return GatewayResult(
            False, failure=Failure("amount_too_large", f"the {kind} exceeds what is left")
        )
    prefix = "re" if kind == "refund" else kind
    return GatewayResult(True, reference=f"{prefix}_sim_{uuid.uuid4().hex}")


def _room(kind: str, rows: list[tuple[str, dict[str, Any], int]]) -> int:
    """What a capture may take (the authorized amount) or a refund may still return."""
    authorized = next(amount for k, _, amount in rows if k == "authorize")
    if kind == "capture":
        return authorized
    auth = next(r for k, r, _ in rows if k == "authorize")
    captures = [amount for k, r, amount in rows if k == "capture" and r["succeeded"]]
    captured = captures[0] if captures else (authorized if auth["outcome"] == "CAPTURED" else 0)
    refunded = sum(amount for k, r, amount in rows if k == "refund" and r["succeeded"])
    return captured - refunded


def _ledger_refund(row: dict[str, Any]) -> LedgerRefund:
    return LedgerRefund(
        reference=row["reference"],
        key=row["key"],
        amount_minor=row["amount_minor"],
        created_at=datetime.fromisoformat(row["created_at"]),
    )


def _charge_status(rows: list[tuple[str, dict[str, Any]]]) -> str:
    kinds = {kind for kind, result in rows if result.get("succeeded", True)}
    auth = next((r for k, r in rows if k == "authorize"), None)
    if auth is None:
        return "UNKNOWN"
    if "void" in kinds:
        return "VOIDED"
    if auth["outcome"] == "CAPTURED":
        return "CAPTURED"
    if auth["outcome"] == "AUTHORIZED":
        return "AUTHORIZED_CAPTURED" if "capture" in kinds else "AUTHORIZED"
    return str(auth["outcome"])


_INSERT_AUTHORIZATION = (
    "INSERT OR IGNORE INTO ledger (key, kind, payment_id, reference, amount_minor, currency,"
    " result, settle_at, created_at) VALUES (:key, :kind, :payment_id, :reference,"
    " :amount_minor, :currency, :result, :settle_at, :created_at)"
)


def _authorization_row(
    request: AuthorizationRequest, authorization: Authorization, settle_at: datetime | None
) -> dict[str, Any]:
    """The ledger row of an authorization, as a read of it returns it."""
    return {
        "key": request.idempotency_key,
        "kind": "authorize",
        "payment_id": request.payment_id,
        "reference": authorization.reference,
        "amount_minor": request.amount.amount_minor,
        "currency": request.amount.currency,
        "result": _encode(authorization),
        "settle_at": settle_at.isoformat() if settle_at else None,
        "created_at": datetime.now(UTC).isoformat(),
    }


def _encode(authorization: Authorization) -> str:
    card = authorization.card
    failure = authorization.failure
    return json.dumps(
        {
            "outcome": authorization.outcome.value,
            "card": [card.brand, card.last4, card.exp_month, card.exp_year, card.fingerprint]
            if card
            else None,
            "failure": [failure.code, failure.message, failure.decline_code] if failure else None,
        }
    )


def _authorization(row: dict[str, Any]) -> Authorization:
    body = json.loads(row["result"])
    card = CardDetails(*body["card"]) if body["card"] else None
    failure = Failure(*body["failure"]) if body["failure"] else None
    return Authorization(AuthorizationOutcome(body["outcome"]), row["reference"], card, failure)


def _result_json(result: GatewayResult) -> dict[str, Any]:
    failure = result.failure
    return {
        "succeeded": result.succeeded,
        "reference": result.reference,
        "failure": [failure.code, failure.message, failure.decline_code] if failure else None,
    }


def _result(body: dict[str, Any]) -> GatewayResult:
    failure = Failure(*body["failure"]) if body["failure"] else None
    return GatewayResult(body["succeeded"], body["reference"], failure)
