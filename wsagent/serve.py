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
  supervises them, forwards signals, and reports ready when all are.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress

from . import systemd
from .config import Settings, gc_thresholds, load_settings
from .logs import WORKER_NUMBER, configure_logging
from .producers import load_agents
from .server import WORKER_OF, WsAgentServer
from .tuning import tune_gc, tune_malloc

__all__ = ["main", "serve_until_signalled", "supervise"]

log = logging.getLogger("wsagent.serve")

_READY_FD = "WSAGENT_READY_FD"


async def serve_until_signalled(settings: Settings, argv: Sequence[str] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    sockets = systemd.listen_sockets()
    server = await WsAgentServer(settings, sock=sockets[0] if sockets else None).start()
    tune_gc(gc_thresholds(settings))
    tune_malloc()
    _announce_ready(server)
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


def _announce_ready(server: WsAgentServer) -> None:
    systemd.notify(f"READY=1\nSTATUS=listening on {server.url}")
    fd = os.environ.pop(_READY_FD, None)
    if fd is not None:
        with os.fdopen(int(fd), "w") as pipe:
            pipe.write(f"{server.url}\n")


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``--workers`` copies of this server on one port and stand between them and systemd."""
    if not settings.redis_url:
        log.warning("%d workers without --redis-url: resume, attach, cancel, client ids and per-user limits are "
                    "per process (a client that reconnects to another worker cannot resume its run); "
                    "give them a Redis to share them", settings.workers)
    children: list[subprocess.Popen[bytes]] = []
    pipes: list[int] = []
    for number in range(1, settings.workers + 1):
        read, write = os.pipe()
        env = {**os.environ, _READY_FD: str(write), WORKER_OF: str(os.getpid()), WORKER_NUMBER: str(number)}
        env.pop("NOTIFY_SOCKET", None)
        command = [sys.executable, "-m", "wsagent.serve", *argv, "--workers", "1"]
        children.append(subprocess.Popen(command, env=env, pass_fds=(write,)))
        os.close(write)
        pipes.append(read)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with suppress(ProcessLookupError):
                child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    urls = []
    for read in pipes:
        with os.fdopen(read) as pipe:
            urls.append(pipe.readline().strip())
    if all(urls):
        log.info("%d workers listening on %s", len(children), urls[0])
        systemd.notify(f"READY=1\nSTATUS={len(children)} workers on {urls[0]}")
    codes = [child.wait() for child in children]
    systemd.notify("STOPPING=1")
    return 0 if all(code == 0 for code in codes) else 1


def event_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop factory for ``--event-loop`` (``None``: asyncio's own), and its name for the log."""
    if choice in ("auto", "uvloop"):
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if choice == "uvloop":
                raise SystemExit('--event-loop uvloop: uvloop is not installed (pip install "wsagent[fast]")') from None
        else:
            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return None, "asyncio"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    settings = load_settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return supervise(settings, args)
    factory, name = event_loop(settings.event_loop)
    log.info("event loop: %s", name)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_until_signalled(settings, args))
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
