"""Our services' names and method paths, from the generated descriptors: the one place
that knows that PaymentService's Charge is `/payments.v1.PaymentService/Charge`."""

from __future__ import annotations

from payments.v1 import admin_service_pb2, payment_service_pb2

PACKAGE = payment_service_pb2.DESCRIPTOR.package  # payments.v1
SERVICE_NAME = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name
ADMIN_SERVICE_NAME = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# The one service path prefix: "/payments.v1.PaymentService/".
PAYMENT_SERVICE_PATH = f"/{SERVICE_NAME}/"
_OURS = f"/{PACKAGE}."  # PaymentService and AdminService; health, reflection: not ours


def payment_method(name: str) -> str:
    """'Charge' -> '/payments.v1.PaymentService/Charge'."""
    return f"{PAYMENT_SERVICE_PATH}{name}"


def is_ours(method: str) -> bool:
    """A method of our own services (authenticated, limited, validated), not health or
    reflection."""
    return method.startswith(_OURS)


def split_method(full_method: str) -> tuple[str, str]:
    """'/payments.v1.PaymentService/Charge' -> ('payments.v1.PaymentService', 'Charge')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method
