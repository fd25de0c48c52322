"""WORKERS=2: two server processes on one port (SO_REUSEPORT) under one supervisor, each
with its own INSTANCE_ID; both answer, a killed worker is replaced, SIGTERM stops all.
SQLite refuses WORKERS > 1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from grpc import aio
from payments.v1 import payment_service_pb2_grpc
from payments.v1 import resources_pb2 as pb

from bench.server import free_port
from tests.e2e.server_process import ServerProcess, server_env
from tests.helpers.builders import card, charge_request
from tests.helpers.credentials import client_metadata

pytestmark = pytest.mark.slow

WORKER_LISTENING = re.compile(r"payment-grpc listening port=(\d+) instance_id=(\S+)")
RESTARTING = re.compile(r"worker (\d+) exited with .*: restarting it")
CONNECTIONS = 16  # separate TCP connections: the kernel spreads them over the workers
CALL_TIMEOUT_S = 30
TCP_ESTABLISHED = "01"
CAPTURED = pb.PAYMENT_STATUS_CAPTURED
Stub = payment_service_pb2_grpc.PaymentServiceStub


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = pathlib.Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return [
        int(pid)
        for pid in children.split()
        if b"spawn_main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def connected_ports(pid: int) -> set[int]:
    """Local ports of the established TCP connections process `pid` holds (Linux /proc)."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_ESTABLISHED and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@contextlib.asynccontextmanager
async def new_connections(port: int) -> AsyncIterator[list[Stub]]:
    """CONNECTIONS stubs, each on its own TCP connection (no shared subchannel)."""
    channels = [
        aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.channel_id", uuid.uuid4().hex)],
            interceptors=client_metadata(),
        )
        for _ in range(CONNECTIONS)
    ]
    try:
        yield [Stub(channel) for channel in channels]
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))


async def charge_on_each(stubs: list[Stub]) -> list[int]:
    replies = await asyncio.gather(
        *(
            stub.Charge(charge_request(method=card("tok_visa")), timeout=CALL_TIMEOUT_S)
            for stub in stubs
        )
    )
    return [reply.payment.status for reply in replies]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_workers_on_one_port_both_answer_and_a_dead_one_is_replaced(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    port = free_port()
    env = server_env(database_url, tmp_path, PORT=str(port), WORKERS="2", INSTANCE_ID="box")
    server = ServerProcess(env, cwd=tmp_path)
    try:
        await server.start()
        if len(WORKER_LISTENING.findall(server.log)) < 2:
            await server.wait_for_line(WORKER_LISTENING)
        identities = {m for m in WORKER_LISTENING.findall(server.log)}
        assert identities == {(str(port), "box-w0"), (str(port), "box-w1")}
        assert server.process is not None
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2

        async with new_connections(port) as stubs:
            assert await charge_on_each(stubs) == [CAPTURED] * CONNECTIONS
            # each worker process holds some of the connections: both answered
            assert [port in connected_ports(pid) for pid in workers] == [True, True]

        os.kill(workers[0], signal.SIGKILL)
        await server.wait_for_line(RESTARTING)
        replaced = await server.wait_for_line(WORKER_LISTENING)
        assert replaced.groups() in identities  # the dead worker's own INSTANCE_ID again
        now = worker_pids(server.process.pid)
        assert workers[1] in now
        assert workers[0] not in now
        assert len(now) == 2
        async with new_connections(port) as stubs:
            assert await charge_on_each(stubs) == [CAPTURED] * CONNECTIONS

        server.sigterm()
        assert await asyncio.wait_for(server.wait(), 60) == 0
        assert "Traceback" not in server.log, server.log
    finally:
        server.kill()


async def process_exit(pid: int) -> None:
    """Returns when process `pid` has ended (its pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        return
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, ended.set)
    try:
        await ended.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_workers_end_with_a_killed_supervisor(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    env = server_env(database_url, tmp_path, PORT=str(free_port()), WORKERS="2")
    server = ServerProcess(env, cwd=tmp_path)
    try:
        await server.start()
        if len(WORKER_LISTENING.findall(server.log)) < 2:
            await server.wait_for_line(WORKER_LISTENING)
        assert server.process is not None
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        server.kill()  # SIGKILL: the supervisor cannot pass anything on
        assert await asyncio.wait_for(server.wait(), 60) == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*(process_exit(pid) for pid in workers)), 60)
    finally:
        server.kill()


def test_sqlite_refuses_more_than_one_worker(tmp_path: pathlib.Path) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'payments.db'}",
        "WORKERS": "2",
        "DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "payment_grpc", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "payment-grpc: WORKERS=2 needs PostgreSQL: SQLite's status bus is in-process, so"
        " watchers on one worker would miss the others' changes (set WORKERS=1)"
    ]
    assert not (tmp_path / "payments.db").exists()  # refused before anything was created


WEBHOOKS_LISTENING = re.compile(r"stripe webhooks listening port=(\d+)")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_workers_share_the_webhook_port_too(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    """GATEWAY=stripe with a webhook secret: each worker opens the webhook listener on
    WEBHOOK_PORT (SO_REUSEPORT, like the gRPC port); before, the second worker died on
    'address already in use'."""
    from tests.stripe_sim import API_KEY, WEBHOOK_SECRET, running_simulator

    hooks = free_port()
    async with running_simulator(tmp_path) as sim:
        env = server_env(
            database_url,
            tmp_path,
            PORT=str(free_port()),
            WORKERS="2",
            GATEWAY="stripe",
            STRIPE_API_KEY=API_KEY,
            STRIPE_API_BASE=sim.base_url,
            STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
            WEBHOOK_PORT=str(hooks),
        )
        server = ServerProcess(env, cwd=tmp_path)
        try:
            await server.start()
            while len(WORKER_LISTENING.findall(server.log)) < 2:
                await server.wait_for_line(WORKER_LISTENING)
            assert WEBHOOKS_LISTENING.findall(server.log) == [str(hooks)] * 2, server.log
            server.sigterm()
            assert await asyncio.wait_for(server.wait(), 60) == 0
            assert "Traceback" not in server.log, server.log
        finally:
            server.kill()
