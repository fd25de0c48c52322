"""The simulated gateway's failure mix: one value for GATEWAY_FAILURE_MIX (config.py) and
`gateway-sim --failure-mix`, read and checked here for both (stdlib only, so the settings
can name it without loading the engine)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields


@dataclass(frozen=True, slots=True)
class FailureMix:
    """Relative weights of the failure kinds for tokens without a fixed outcome, written
    "declined=60,insufficient_funds=10,network_error=20,invalid_method=10"; a kind left
    out keeps its default weight."""

    declined: int = 60
    insufficient_funds: int = 10
    network_error: int = 20
    invalid_method: int = 10

    def __post_init__(self) -> None:
        weights = astuple(self)
        if min(weights) < 0:
            raise ValueError("a failure weight cannot be negative")
        if not any(weights):
            raise ValueError("at least one failure kind needs a positive weight")

    @classmethod
    def parse(cls, spec: str) -> FailureMix:
        """From "kind=weight,..."; ValueError on a part that is not a known kind=weight."""
        kinds = {kind.name for kind in fields(cls)}
        weights: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, equals, weight = part.partition("=")
            if not equals or name.strip() not in kinds:
                raise ValueError(f"{part!r} is not kind=weight, kind one of {sorted(kinds)}")
            weights[name.strip()] = int(weight)
        return cls(**weights)
