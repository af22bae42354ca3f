"""What the tests run beside wsagent: third-party software in virtual environments of its own (pinned,
made on first use and kept), and processes started until they say they are ready."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

__all__ = ["pinned_venv", "started", "free_port", "Notifications"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pinned_venv(kind: str, requirements: Path, env_var: str, then: Sequence[Sequence[str]] = ()) -> Path:
    """A venv with every package of ``requirements`` (then each of ``then``, as pip arguments): in ``$env_var``,
    or ``~/.cache/wsagent/<kind>-<digest of the requirements>``; made again when the requirements change."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    venv = Path(os.environ.get(env_var) or Path.home() / ".cache" / "wsagent" / f"{kind}-{digest}")
    marker = venv / "requirements.txt"
    if marker.exists() and marker.read_bytes() == requirements.read_bytes():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    for arguments in (["-r", str(requirements)], *then):
        subprocess.run([*pip, *arguments], check=True, timeout=540)
    shutil.copy(requirements, marker)
    return venv


#: How long a process may take to exit after SIGTERM before it is killed and the test fails: a node's
#: drain (the tests' at most 30 s) and its close.
STOP_LIMIT = 45.0


@contextlib.asynccontextmanager
async def started(command: Sequence[str], ready: bytes, *, env: dict[str, str] | None = None,
                  cwd: Path | None = None, limit: float = 90) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``command`` until it prints a line with ``ready`` (its output is read to its end meanwhile, so
    a full pipe never stalls it), and give its process; stop it on the way out (if the test did not)."""
    process = await asyncio.create_subprocess_exec(*command, cwd=cwd, env={**os.environ, **(env or {})},
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    said: deque[str] = deque(maxlen=200)
    settled = asyncio.Event()  # ready, or its output ended
    up = False

    async def read() -> None:
        nonlocal up
        assert process.stdout is not None
        async for line in process.stdout:
            said.append(line.decode(errors="replace"))
            if ready in line:
                up = True
                settled.set()
        settled.set()

    reader = asyncio.create_task(read())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(settled.wait(), limit)
        if not up:
            raise RuntimeError(f"{Path(command[0]).name} did not start in {limit:g} s:\n" + "".join(said))
        yield process
    finally:
        hung = False
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a test may have stopped it
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_LIMIT)
            except TimeoutError:
                hung = True
                process.kill()
                await process.wait()
        await reader
        if hung:  # a process that does not stop when told is a defect, not a slow teardown
            raise RuntimeError(f"{Path(command[0]).name} did not exit within {STOP_LIMIT:g} s of SIGTERM; it said:\n"
                               + "".join(said))


class Notifications:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def expect(self, prefix: str, limit: float = 20) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit):
            while True:
                message = (await loop.sock_recv(self.sock, 4096)).decode()
                self.seen.append(message)
                if message.startswith(prefix):
                    return message

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
