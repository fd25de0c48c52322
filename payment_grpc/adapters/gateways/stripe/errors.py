"""The one place where the Stripe SDK's exceptions become the gateway port's.

| Stripe SDK                                   | here                                    |
|----------------------------------------------|-----------------------------------------|
| CardError (402)                              | CardDeclined: a decline with decline_code |
| InvalidRequestError (400/404)                | Refused: permanent, nothing happened    |
| RateLimitError (429)                         | GatewayUnreachable: not processed, retry |
| APIConnectionError, cause connect failure    | GatewayUnreachable: nothing was sent           |
| APIConnectionError, any other cause          | GatewayTimeout: outcome unknown         |
| APIError (5xx, 409 key in use), other errors | GatewayTimeout: outcome unknown         |
| IdempotencyError                             | GatewayTimeout + ERROR log (our bug)    |
| AuthenticationError, PermissionError         | GatewayUnreachable + ERROR log (misconfigured) |

"Unknown" never turns a payment FAILED: it stays PROCESSING and a lookup settles it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import stripe

from payment_grpc.domain.payment import Failure
from payment_grpc.service.ports import GatewayTimeout, GatewayUnreachable

log = logging.getLogger(__name__)

NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


class CardDeclined(Exception):
    """The issuer declined: a normal answer, carried as the payment's failure."""

    def __init__(self, failure: Failure, reference: str) -> None:
        super().__init__(failure.code)
        self.failure = failure
        self.reference = reference


class Refused(Exception):
    """Stripe refused the request for good (invalid parameters or state)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.code)
        self.failure = failure


@contextmanager
def stripe_edge(operation: str) -> Iterator[None]:
    try:
        yield
    except stripe.CardError as exc:
        raise CardDeclined(_failure(exc, "card_declined"), _intent_id(exc)) from exc
    except stripe.IdempotencyError as exc:
        log.error("stripe %s: idempotency key reused with other parameters: %s", operation, exc)
        raise GatewayTimeout(f"stripe {operation}: idempotency error") from exc
    except stripe.InvalidRequestError as exc:
        raise Refused(_failure(exc, "invalid_request")) from exc
    except stripe.RateLimitError as exc:
        raise GatewayUnreachable(f"stripe {operation}: rate limited") from exc
    except (stripe.AuthenticationError, stripe.PermissionError) as exc:
        log.error("stripe %s: the API key was refused (%s); check STRIPE_API_KEY", operation, exc)
        raise GatewayUnreachable(f"stripe {operation}: authentication failed") from exc
    except stripe.APIConnectionError as exc:
        if isinstance(exc.__cause__, NOTHING_SENT):
            raise GatewayUnreachable(f"stripe {operation}: unreachable") from exc
        raise GatewayTimeout(f"stripe {operation}: no answer") from exc
    except stripe.StripeError as exc:
        raise GatewayTimeout(f"stripe {operation}: {type(exc).__name__}") from exc


def _failure(exc: stripe.StripeError, default_code: str) -> Failure:
    error = exc.error
    code = (error.code if error else None) or exc.code or default_code
    decline_code = (error.decline_code if error else None) or ""
    message = (error.message if error else None) or exc.user_message or ""
    return Failure(str(code), str(message), str(decline_code))


def _intent_id(exc: stripe.StripeError) -> str:
    intent = exc.error.payment_intent if exc.error else None
    return str(intent.id) if intent is not None else ""
