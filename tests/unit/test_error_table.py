"""The one error table: every reportable error maps to a deliberate code, looked up along
the class's MRO, and an unmapped one is logged instead of silently becoming INTERNAL."""

from __future__ import annotations

import logging

import grpc
import pytest

import payment_grpc.bootstrap  # noqa: F401 - imports every module that defines errors
from payment_grpc.api.errors import ERROR_TABLE, code_for, entry_for, status_proto_for
from payment_grpc.domain.errors import DomainError, PaymentNotFound, ReportableError
from payment_grpc.service.errors import ServiceError
from payment_grpc.service.ports import GatewayError

ABSTRACT_BASES = {ReportableError, DomainError, ServiceError, GatewayError}


def _subclasses(root: type) -> set[type]:
    found: set[type] = set()
    pending = [root]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                pending.append(sub)
    return found


def _package_errors() -> list[type[ReportableError]]:
    return sorted(
        (
            cls
            for cls in _subclasses(ReportableError)
            if cls.__module__.startswith("payment_grpc.") and cls not in ABSTRACT_BASES
        ),
        key=lambda cls: cls.__qualname__,
    )


def _mapped_by(cls: type) -> type | None:
    return next((base for base in cls.__mro__ if base in ERROR_TABLE), None)


def test_the_walk_finds_the_errors_of_every_layer() -> None:
    names = {cls.__name__ for cls in _package_errors()}
    assert {"PaymentNotFound", "Unauthenticated", "GatewayTimeout", "GatewayRefused"} <= names


@pytest.mark.parametrize("cls", _package_errors(), ids=lambda cls: cls.__name__)
def test_every_error_of_the_package_maps_to_a_deliberate_code(cls: type) -> None:
    mapped_by = _mapped_by(cls)
    assert mapped_by is not None, f"{cls.__name__} has no entry in ERROR_TABLE"
    assert mapped_by not in ABSTRACT_BASES, f"{cls.__name__} only maps through a generic base"


def test_a_subclass_of_a_mapped_error_keeps_its_code() -> None:
    class ArchivedPaymentNotFound(PaymentNotFound):
        reason = "ARCHIVED_PAYMENT_NOT_FOUND"

    error = ArchivedPaymentNotFound("pay_1")
    assert code_for(error) is grpc.StatusCode.NOT_FOUND
    assert status_proto_for(error).message == "payment pay_1 not found"


def test_an_unmapped_error_is_logged_once_with_its_name_and_answered_as_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unforeseen(DomainError):
        reason = "UNFORESEEN"

    caplog.set_level(logging.ERROR, logger="payment_grpc.api.errors")
    first = status_proto_for(Unforeseen("secret detail"))
    code_for(Unforeseen("again"))
    assert first.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret detail" not in first.message
    logged = [r for r in caplog.records if "Unforeseen" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert entry_for(Unforeseen) == (grpc.StatusCode.INTERNAL, None)
