"""gRPC health: readiness (the service name) follows the database, NOT_SERVING while it is
unreachable and SERVING after; liveness ("") never follows it."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from payment_grpc.bootstrap import build_application
from tests.conftest import make_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TcpProxy:
    """A loopback proxy to PostgreSQL that the test can take down and bring back."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._pipes):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._pipes |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self._pipes.discard(writer)


async def _statuses(port: int, service: str) -> aio.UnaryStreamCall:  # type: ignore[type-arg]
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))


async def _check(port: int, service: str) -> health_pb2.HealthCheckResponse:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply: health_pb2.HealthCheckResponse = await stub.Check(
            health_pb2.HealthCheckRequest(service=service)
        )
        return reply


async def _next_status(call: aio.UnaryStreamCall, wanted: int) -> None:  # type: ignore[type-arg]
    while (await call.read()).status != wanted:
        pass


async def test_health_flips_when_the_database_goes_away_and_returns(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    proxy = None
    if database_url.startswith("postgresql"):
        url = make_url(database_url)
        proxy = TcpProxy(url.port or 5432)
        await proxy.up()
        database_url = url.set(port=proxy.port).render_as_string(hide_password=False)
    app = build_application(make_settings(database_url, tmp_path))
    await app.start()
    try:
        readiness = await _statuses(app.port, "payments.v1.PaymentService")
        liveness = await _statuses(app.port, "")
        await _next_status(readiness, SERVING)
        await _next_status(liveness, SERVING)
        await _take_database_away(proxy, tmp_path)
        await _next_status(readiness, NOT_SERVING)
        # A database outage must not get every pod restarted: liveness stays SERVING.
        assert (await _check(app.port, "")).status == SERVING
        await _bring_database_back(proxy, tmp_path)
        await _next_status(readiness, SERVING)
        readiness.cancel()
        liveness.cancel()
    finally:
        await app.stop()
        if proxy is not None:
            await proxy.down()


async def _take_database_away(proxy: TcpProxy | None, tmp_path: pathlib.Path) -> None:
    if proxy is not None:
        await proxy.down()
    else:
        (tmp_path / "db").rename(tmp_path / "db-away")


async def _bring_database_back(proxy: TcpProxy | None, tmp_path: pathlib.Path) -> None:
    if proxy is not None:
        await proxy.up()
    else:
        (tmp_path / "db-away").rename(tmp_path / "db")
