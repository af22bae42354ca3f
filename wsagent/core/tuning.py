"""Process settings that keep a streaming server's per-token cost low.

The collector's and malloc's are applied once, after startup, by
:mod:`wsagent.serve` and the simulator; the benchmark's load client applies
them too, so that it does not spend on its own overhead the cores the servers
it measures need. Each changes the whole process, so none is applied by
:class:`~wsagent.wiring.server.WsAgentServer`, which a program may embed.
"""

from __future__ import annotations

import ctypes
import gc
import sys

__all__ = ["DEFAULT_GC_THRESHOLDS", "tune_gc", "tune_malloc", "break_transport_cycles"]

#: ``--gc-thresholds``' default, also used by the simulator and the benchmark's load client.
DEFAULT_GC_THRESHOLDS = (50_000, 20, 100)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_gc(thresholds: tuple[int, int, int] | None) -> None:
    """Keep the cyclic collector's pauses out of the stream.

    Each token allocates a few short-lived containers; with CPython's default
    thresholds the collector runs every 700 of them and now and then walks every
    object of every connection, a pause of tens of milliseconds at a few hundred
    streams (measured: p99 added latency 42 ms at 400 streams, 12 ms with this).
    Objects alive after startup are frozen out of collection, and collections
    run less often. Reference counting still frees everything that is not a cycle.
    """
    if thresholds is None:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


def tune_malloc() -> bool:
    """Stop glibc from mapping and unmapping memory for every socket read.

    asyncio reads a socket into a fresh 256 KiB buffer (its transports'
    ``max_size``) and shrinks it to what arrived. glibc serves allocations that
    large with ``mmap``, so each read of a few hundred bytes (one token) costs
    ``mmap`` + ``mremap`` + ``munmap`` and a page fault: three system calls that
    ``strace -c`` shows beside every ``recvfrom`` of the relay, about 10 µs a
    read. Serving them from the heap, and not trimming the heap's top for the
    few hundred KiB that each read gives back, removes all three. Returns False
    where the C library is not glibc (nothing to change there).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 << 20))


def break_transport_cycles() -> bool:
    """Let a closed socket transport be freed by reference counting (Python 3.11 only).

    Python 3.11's socket transport keeps a bound method of itself
    (``_read_ready_cb``; python/cpython#100348, fixed in 3.12), so every closed
    connection, a client's or an upstream's, waited for the cyclic collector.
    With the collector's thresholds raised (:func:`tune_gc`) that garbage piled
    up between collections: a five-minute soak grew the server by 17 % after
    its first minute. Once the transport has told its protocol the connection
    is lost, nothing reads through it again, so the method is dropped there.
    Returns False where nothing needs changing. It patches a class of the
    standard library for the whole process, so :mod:`wsagent.serve` applies it,
    before its server starts; a program that embeds the server may call it too.
    """
    if sys.version_info >= (3, 12):
        return False
    from asyncio import selector_events

    # getattr and setattr: private names of the standard library, which typeshed does not declare.
    cls = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009
    original = getattr(cls, "_call_connection_lost")  # noqa: B009
    if getattr(original, "breaks_cycle", False):
        return True

    def call_connection_lost(self: object, exc: BaseException | None) -> None:
        try:
            original(self, exc)
        finally:
            setattr(self, "_read_ready_cb", None)  # noqa: B010

    setattr(call_connection_lost, "breaks_cycle", True)  # noqa: B010
    setattr(cls, "_call_connection_lost", call_connection_lost)  # noqa: B010
    return True
