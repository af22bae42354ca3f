"""``python -m wsagent.serve``: run the server until SIGINT or SIGTERM.

On either signal it stops accepting, lets in-flight streams finish for
``--drain-timeout`` seconds, cancels the rest (each run gets its terminal
event), closes clients with 1001 and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from .config import Settings, load_settings
from .logs import configure_logging
from .server import WsAgentServer

__all__ = ["main", "serve_until_signalled"]

log = logging.getLogger("wsagent.serve")


async def serve_until_signalled(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await WsAgentServer(settings).start()
    try:
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve_until_signalled(settings))
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
