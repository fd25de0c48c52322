"""Run `python -m payment_grpc serve` as a real subprocess and follow its log."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import sys

LISTENING = re.compile(r"payment-grpc listening.*port=(\d+)")


class ServerProcess:
    def __init__(self, env: dict[str, str], cwd: pathlib.Path) -> None:
        self._env = {**os.environ, **env}
        self._cwd = cwd
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self.lines: list[str] = []

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "payment_grpc", "serve",
            env=self._env, cwd=self._cwd, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        match = await self.wait_for_line(LISTENING)
        self.port = int(match.group(1))

    async def wait_for_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """Read the server's log until a line matches; fails if the server exits first."""
        assert self.process is not None
        assert self.process.stderr is not None
        while True:
            raw = await self.process.stderr.readline()
            if not raw:
                raise AssertionError("server exited early:\n" + "".join(self.lines[-30:]))
            line = raw.decode(errors="replace")
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def sigterm(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        assert self.process is not None
        assert self.process.stderr is not None
        self.lines += [
            b.decode(errors="replace") for b in (await self.process.stderr.read()).splitlines(True)
        ]
        return await self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
