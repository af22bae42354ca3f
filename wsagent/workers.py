"""``--workers``: the worker processes of one server answer for each other's metrics.

A scrape of ``/metrics`` lands on whichever worker the kernel picks for that
connection (``SO_REUSEPORT``). So each worker also listens on a Unix socket of
its own, in a directory only its user may enter (named after the supervisor's
pid), and answers there with its metrics as plain data; the worker that took
the scrape asks the others and adds everything up (:func:`wsagent.status.merge`).

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
import tempfile
from pathlib import Path
from typing import Any

from .app import App
from .status import snapshot

__all__ = ["WorkerMesh"]

log = logging.getLogger("wsagent.workers")

_ANSWER_WITHIN = 1.0


def _answering() -> dict[str, Any]:
    """One worker's part of ``wsagent_workers_answering`` (summed over the workers that answered)."""
    return {"name": "wsagent_workers_answering", "type": "gauge", "label": "",
            "help": "Worker processes whose metrics this scrape includes.", "values": {"": 1}}


class WorkerMesh:
    """One worker's place among its siblings: serves its own metrics, gathers theirs."""

    def __init__(self, app: App, supervisor: str, number: str) -> None:
        self.app = app
        self.directory = Path(tempfile.gettempdir()) / f"wsagent-{supervisor}"
        self.path = self.directory / f"w{number}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> WorkerMesh:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        if self.directory.stat().st_uid != os.getuid():
            raise PermissionError(f"{self.directory} belongs to another user")
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
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # the last worker to stop removes it
