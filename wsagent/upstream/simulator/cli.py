"""``python -m wsagent.simulator``: serve the simulated model on a port of its own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from ...core.tuning import DEFAULT_GC_THRESHOLDS, tune_gc, tune_malloc
from .app import SimulatorServer
from .settings import SimulatorSettings

__all__ = ["main"]

log = logging.getLogger("wsagent.simulator")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wsagent.simulator",
                                     description="Serve the simulated OpenAI-compatible model.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second (0: unthrottled)")
    parser.add_argument("--tokens", type=int, default=24, help="answer length in tokens")
    parser.add_argument("--no-reasoning", action="store_true", help="do not stream reasoning deltas")
    parser.add_argument("--switches", action="store_true",
                        help="honour sim switches in requests (fault injection for tests and benchmarks)")
    parser.add_argument("--background-kept", type=int, default=SimulatorSettings.background_kept,
                        help="background responses kept in memory, at most (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SimulatorSettings(rate=args.rate, tokens=args.tokens, reasoning=not args.no_reasoning,
                                 switches=args.switches, background_kept=args.background_kept)

    async def run() -> None:
        server = await SimulatorServer(settings, args.host, args.port).start()
        tune_gc(DEFAULT_GC_THRESHOLDS)  # a model server should not pause every stream for the collector either
        tune_malloc()
        log.info("simulated model at %s", server.base_url)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address is not this machine's: one line, as serve says it
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        sys.exit(1)

