"""``--workers``: the worker processes of one server answer for each other's metrics.

A scrape of ``/metrics`` lands on whichever worker the kernel picks for that
connection (``SO_REUSEPORT``). So each worker also listens on a Unix socket of
its own, in a directory only its user may enter, and answers there with its
metrics as plain data; the worker that took the scrape asks the others and adds
everything up (:func:`wsagent.handlers.status.merge`).

That directory is made afresh by the supervisor (:func:`mesh_directory`:
``mkdtemp``, mode 0700, a name no other user can guess and so make first),
under ``$XDG_RUNTIME_DIR`` when that is set and usable, else in the temporary
directory; it is handed to each worker on its command line (:class:`Worker`)
and removed when the supervisor exits. A worker refuses a directory that is not
its user's own with mode 0700. The supervisor removes a dead worker's socket.

Why not prometheus-client's multiprocess mode: it needs the extra dependency,
a directory of memory-mapped files that must be wiped between runs, and
gauges declared with a mode each; here a scrape reads the other workers' live
state directly, a few milliseconds once per scrape, nothing on the hot path.
A worker that does not answer within a second is left out of that scrape, and
``wsagent_workers_answering`` says how many did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..handlers.app import App
from ..handlers.status import snapshot

__all__ = ["Worker", "WorkerMesh", "mesh_directory", "socket_path"]

log = logging.getLogger("wsagent.workers")

_ANSWER_WITHIN = 1.0


def _answering() -> dict[str, Any]:
    """One worker's part of ``wsagent_workers_answering`` (summed over the workers that answered)."""
    return {"name": "wsagent_workers_answering", "type": "gauge", "label": "",
            "help": "Worker processes whose metrics this scrape includes.", "values": {"": 1}}


def mesh_directory() -> str:
    """A new directory for the workers' sockets (the supervisor's, made once): mode 0700, a random name."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            return tempfile.mkdtemp(prefix="wsagent-", dir=runtime)
        except OSError as exc:
            log.warning("XDG_RUNTIME_DIR=%s cannot be used (%s): the workers' sockets go in %s", runtime,
                        exc.strerror or exc, tempfile.gettempdir())
    return tempfile.mkdtemp(prefix="wsagent-")


def socket_path(directory: str, number: int) -> Path:
    """Where worker ``number`` answers for its metrics."""
    return Path(directory) / f"w{number}.sock"


#: The first argument of a worker's command line; the second is ``NUMBER:READY_FD:DIRECTORY``. (No
#: abbreviation of a setting's flag: ``--worker 4`` still means ``--workers 4``.)
WORKER_FLAG = "--as-worker"


@dataclass(frozen=True)
class Worker:
    """Who a worker process is among the ``--workers`` of one server, as its supervisor says on the worker's
    command line (:meth:`argv`). None of it is read from the environment: a process that a worker started, or
    a shell that kept a worker's variables, would inherit them and take itself for a worker too (sharing a
    port with ``SO_REUSEPORT``, answering for metrics in another server's directory)."""

    number: int
    #: The directory of the workers' sockets (:func:`mesh_directory`).
    directory: str
    #: The pipe on which the worker writes its URL once it listens.
    ready_fd: int

    @property
    def tag(self) -> str:
        """``w1``, ``w2``, ...: what names this worker in its connection ids."""
        return f"w{self.number}"

    def argv(self) -> list[str]:
        """The arguments that name this worker at the start of its command line."""
        return [WORKER_FLAG, f"{self.number}:{self.ready_fd}:{self.directory}"]

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> tuple[Worker | None, list[str]]:
        """The worker named at the start of ``argv`` (as :meth:`argv` wrote it), if any, and the arguments
        after it."""
        if not argv or argv[0] != WORKER_FLAG:
            return None, list(argv)
        value = argv[1] if len(argv) > 1 else ""
        number, _, rest = value.partition(":")
        ready_fd, _, directory = rest.partition(":")
        if not (number.isdigit() and ready_fd.isdigit() and directory):
            raise SystemExit(f"{WORKER_FLAG} {value!r}: expected NUMBER:READY_FD:DIRECTORY")
        return cls(int(number), directory, int(ready_fd)), list(argv[2:])


class WorkerMesh:
    """One worker's place among its siblings: serves its own metrics, gathers theirs."""

    def __init__(self, app: App, worker: Worker) -> None:
        self.app = app
        self.directory = Path(worker.directory)
        self.path = socket_path(worker.directory, worker.number)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> WorkerMesh:
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{self.directory}: the workers' directory must be a directory of this user's "
                                  "own with mode 0700")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))
        return self

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(snapshot(self.app)).encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def snapshots(self) -> list[list[dict[str, Any]]]:
        """Each other worker's metrics, asked all at once."""
        others = sorted(p for p in self.directory.glob("w*.sock") if p != self.path)
        answers = await asyncio.gather(*(self._ask(path) for path in others))
        return [[_answering()], *(answer for answer in answers if answer is not None)]

    async def _ask(self, path: Path) -> list[dict[str, Any]] | None:
        try:
            async with asyncio.timeout(_ANSWER_WITHIN):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
            families = json.loads(data)
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("worker at %s did not answer for metrics: %r", path.name, exc)
            return None
        return [*families, _answering()] if isinstance(families, list) else None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # the directory is the supervisor's to remove
