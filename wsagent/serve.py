"""``python -m wsagent.serve``: run the server as a service.

* SIGINT or SIGTERM: stop accepting, let in-flight streams finish for
  ``--drain-timeout`` seconds, cancel the rest (each run gets its terminal
  event), close clients with 1001, exit 0.
* SIGHUP: re-read ``--env-file`` and the key and workflow files, and apply
  what is safe to change live (see :data:`wsagent.config.RELOADABLE`).
* systemd: ``READY=1`` once listening, ``WATCHDOG=1`` at half the watchdog
  period, ``RELOADING=1`` around a reload, ``STOPPING=1`` at shutdown; a socket
  passed by socket activation (``LISTEN_FDS``) is used instead of binding.
* ``--workers N``: N processes share the port with SO_REUSEPORT; this process
  supervises them, forwards signals, reports ready when all are, and restarts
  one that dies, with a backoff (:class:`Supervisor`). Each worker is told who
  it is on its command line (:class:`wsagent.workers.Worker`).
* The process-wide tuning of :mod:`wsagent.tuning` is applied here, to a process
  that is only the server; :class:`~wsagent.server.WsAgentServer` itself leaves
  the process as it found it, for programs that embed it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

from .core.config import Settings, load_settings
from .core.logs import configure_logging
from .core.tuning import break_transport_cycles, tune_gc, tune_malloc
from .engine.transcripts import prepare_directory
from .upstream.agents.producers import AgentsSpecError, load_agents
from .wiring import systemd
from .wiring.server import WsAgentServer
from .wiring.workers import Worker, mesh_directory, socket_path

__all__ = ["main", "serve_until_signalled", "supervise", "Supervisor", "restart_delay"]

log = logging.getLogger("wsagent.serve")


async def serve_until_signalled(settings: Settings, argv: Sequence[str] | None = None,
                                worker: Worker | None = None) -> None:
    """Serve until SIGINT or SIGTERM, reloading on SIGHUP (``argv``: the flags to read again then)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    sockets = systemd.listen_sockets()
    break_transport_cycles()
    server = await WsAgentServer(settings, sock=sockets[0] if sockets else None, worker=worker).start()
    tune_gc(settings.gc_thresholds)  # after the start: what startup made is frozen out of collection
    tune_malloc()
    _announce_ready(server, worker)
    watchdog = systemd.watchdog_interval()
    try:
        while not stop.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(reload.wait())]
            await asyncio.wait(waiters, timeout=watchdog, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if watchdog:
                systemd.notify("WATCHDOG=1")
            if reload.is_set() and not stop.is_set():
                reload.clear()
                systemd.notify("RELOADING=1")
                try:
                    new = load_settings(argv)
                    server.reload(new, await asyncio.to_thread(load_agents, new.agents))
                except (SystemExit, OSError, ValueError) as exc:
                    log.error("reload failed, keeping the running settings: %s", exc)
                systemd.notify("READY=1")
        log.info("signal received: shutting down")
        systemd.notify("STOPPING=1")
    finally:
        await server.stop()


def _announce_ready(server: WsAgentServer, worker: Worker | None) -> None:
    systemd.notify(f"READY=1\nSTATUS=listening on {server.url}")
    if worker is not None:
        with os.fdopen(worker.ready_fd, "w") as pipe:
            pipe.write(f"{server.url}\n")


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``--workers`` copies of this server on one port and stand between them and systemd."""
    if not settings.redis_url:
        log.warning("%d workers without --redis-url: resume, attach, cancel, client ids and per-user limits are "
                    "per process (a client that reconnects to another worker cannot resume its run); "
                    "give them a Redis to share them", settings.workers)
    return asyncio.run(Supervisor(settings.workers, argv).run())


#: Restarts of a worker that died: the first after 0.5 s, then twice as long each time, at most 30 s (each
#: delay times a random 0.5 to 1, so workers that died together do not all start again together); a worker
#: that ran for a minute before it died is restarted as if for the first time.
RESTART_FIRST, RESTART_MAX, RESTART_RESET_AFTER = 0.5, 30.0, 60.0


def restart_delay(failures: int) -> float:
    """Seconds before the restart of a worker that died ``failures`` times in a row before this."""
    return min(RESTART_MAX, RESTART_FIRST * 2.0 ** min(failures, 32)) * random.uniform(0.5, 1.0)


def exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@dataclass
class _Slot:
    """One worker's place: its number, and the process that holds it now."""

    number: int
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    failures: int = 0  # deaths in a row, each after less than RESTART_RESET_AFTER seconds
    restarts: int = 0


class Supervisor:
    """``--workers``: starts the workers, tells systemd when all listen, forwards signals, and restarts a
    worker that dies (logging its death and its restart, removing its socket), until SIGINT or SIGTERM.

    A worker that dies before it ever listened stops the whole server (exit 1): a worker that cannot start
    (a port in use, a bad setting) would not start the next time either.
    """

    def __init__(self, count: int, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.slots = [_Slot(number) for number in range(1, count + 1)]
        self.directory = ""
        self.url = ""
        self._up = 0
        self._stopping = asyncio.Event()
        self._failed = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP, True)
        try:
            try:
                self.directory = mesh_directory()
            except OSError as exc:
                log.error("cannot make a directory for the workers' sockets: %s", exc)
                return 1
            try:
                codes = await asyncio.gather(*(self._keep(slot) for slot in self.slots))
            finally:
                shutil.rmtree(self.directory, ignore_errors=True)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        systemd.notify("STOPPING=1")
        return 0 if not self._failed and all(code == 0 for code in codes) else 1

    def stop(self, signum: int) -> None:
        """SIGINT or SIGTERM: to every worker, and no more restarts."""
        self._stopping.set()
        self._forward(signum)

    def _forward(self, signum: int, ready_only: bool = False) -> None:
        # A worker still starting has no SIGHUP handler yet (SIGHUP would kill it); it reads the settings anyway.
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None and (slot.ready or not ready_only):
                with suppress(ProcessLookupError):
                    process.send_signal(signum)

    async def _keep(self, slot: _Slot) -> int:
        """Keep a worker in ``slot`` until the server stops; its last exit code."""
        try:
            return await self._supervise(slot)
        except Exception:
            log.exception("supervising worker w%d failed: stopping", slot.number)
            self._failed = True
            self.stop(signal.SIGTERM)
            if slot.process is not None:
                await slot.process.wait()
            return 1

    async def _supervise(self, slot: _Slot) -> int:
        while not self._stopping.is_set():  # one worker process each time round
            born = time.monotonic()
            process, url = await self._spawn(slot)
            if url:
                slot.ready = True
                if slot.restarts:
                    log.info("worker w%d restarted (pid %d)", slot.number, process.pid)
                    self._status()
                else:
                    self._listening(url)
            code = await process.wait()
            slot.ready = False
            if self._stopping.is_set():
                return code
            lived = time.monotonic() - born
            with suppress(OSError):
                socket_path(self.directory, slot.number).unlink()
            if not url and not slot.restarts:
                log.error("worker w%d (pid %d) %s before it was ready: stopping", slot.number, process.pid,
                          exit_status(code))
                self._failed = True
                self.stop(signal.SIGTERM)
                return code
            log.error("worker w%d (pid %d) died %s %.1f s: %s", slot.number, process.pid,
                      "after" if url else "before it was ready, after", lived, exit_status(code))
            if lived >= RESTART_RESET_AFTER:
                slot.failures = 0
            delay = restart_delay(slot.failures)
            slot.failures += 1
            slot.restarts += 1
            log.warning("restarting worker w%d in %.2f s (death %d in a row)", slot.number, delay, slot.failures)
            self._status()
            with suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
        return 0  # stopped before its worker started (again)

    async def _spawn(self, slot: _Slot) -> tuple[asyncio.subprocess.Process, str]:
        """A new worker for ``slot``, and the URL it says it listens on once it does ("" if it died first)."""
        read, write = os.pipe()
        worker = Worker(slot.number, self.directory, write)
        env = {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}  # (systemd hears us)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wsagent.serve", *worker.argv(), *self.argv, "--workers", "1", env=env,
                pass_fds=(write,))
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        slot.process = process
        if self._stopping.is_set():  # a SIGTERM came while it was being started
            with suppress(ProcessLookupError):
                process.terminate()
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read, "rb", buffering=0))
        try:
            line = await reader.readline()  # the URL, or nothing: the worker is gone
        finally:
            transport.close()
        return process, line.decode(errors="replace").strip()

    def _listening(self, url: str) -> None:
        self._up += 1
        self.url = self.url or url
        if self._up == len(self.slots):
            log.info("%d workers listening on %s", len(self.slots), self.url)
            systemd.notify(f"READY=1\nSTATUS={len(self.slots)} workers on {self.url}")

    def _status(self) -> None:
        up = sum(slot.ready for slot in self.slots)
        systemd.notify(f"STATUS={up} of {len(self.slots)} workers on {self.url}")


def event_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop factory for ``--event-loop`` (``None``: asyncio's own), and its name for the log."""
    if choice in ("auto", "uvloop"):
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if choice == "uvloop":
                raise SystemExit('--event-loop uvloop: uvloop is not installed (pip install ".[fast]")') from None
        else:
            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return None, "asyncio"


def main(argv: Sequence[str] | None = None) -> int:
    worker, args = Worker.from_argv(sys.argv[1:] if argv is None else argv)
    settings = load_settings(args)
    configure_logging(settings.log_level, settings.log_format, worker.tag if worker is not None else "")
    if settings.workers > 1:
        if settings.transcripts_dir:
            prepare_directory(settings.transcripts_dir)  # one line here, not one per worker
        return supervise(settings, args)
    factory, name = event_loop(settings.event_loop)
    log.info("event loop: %s", name)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_until_signalled(settings, args, worker))
    except AgentsSpecError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
