"""An answer played out: a wire format's events paced at the answer's rate, with the faults the switches ask
for (``error_after``, ``stall_after``, ``drop_after``, ``comment_every``, ``long``, ``pad``, ``stamp``), written
into a :class:`Sink`: a connection (:mod:`.app`), or a background response's kept events (:mod:`.background`)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Literal, Protocol

from .chat_format import ChatFormat
from .responses_format import ResponsesFormat

__all__ = ["Ending", "Format", "Sink", "play"]

Format = ChatFormat | ResponsesFormat

#: How :func:`play` ended: the whole answer, the ``error_after`` error, or the ``drop_after`` cut.
Ending = Literal["end", "error", "drop"]


class Sink(Protocol):
    """Where an answer is played."""

    async def write(self, text: str) -> None:
        """One or more whole events."""

    async def comment(self, text: str) -> None:
        """An SSE comment (``comment_every``): wire only, no event."""

    def drop(self) -> bool:
        """``drop_after`` is reached: cut, and answer True to stop playing; or answer False to go on."""

    def token(self, sent: int) -> None:
        """A token was written; ``sent`` so far."""


async def play(fmt: Format, switches: dict[str, str], default_rate: float, sink: Sink) -> Ending:
    """Write ``fmt``'s answer into ``sink``, paced at ``rate`` tokens a second (0: as fast as the sink takes
    them), with the switches' faults. ``stall_after`` waits until cancelled."""
    the_plan = fmt.plan
    rate = float(switches.get("rate", default_rate))
    interval = 1.0 / rate if rate > 0 else 0.0
    error_after = int(switches.get("error_after", -1))
    stall_after = int(switches.get("stall_after", -1))
    drop_after = int(switches.get("drop_after", -1))
    comment_every = int(switches.get("comment_every", 0))
    stamp = switches.get("stamp") == "1"
    loop = asyncio.get_running_loop()
    await sink.write(fmt.begin())
    sent = 0
    start = loop.time()
    pieces: list[tuple[str, str]] = [("reasoning_content", t) for t in the_plan.reasoning]
    pad = int(switches.get("pad", 0))
    pieces += [("content", _padded(t, pad, n) if pad else t) for n, t in enumerate(the_plan.content)]
    if "long" in switches:
        pieces.append(("content", "x" * int(switches["long"])))
    for kind, text in pieces:
        if sent == error_after:
            await sink.write(fmt.error(switches.get("error_done") == "1"))
            return "error"
        if sent == stall_after:
            await asyncio.Event().wait()
        if sent == drop_after and sink.drop():
            return "drop"
        if interval:
            delay = start + sent * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if comment_every and sent and sent % comment_every == 0:
            await sink.comment(f": ping{fmt.nl}")
        if stamp:
            text = f"{time.monotonic():.6f} "
        await sink.write(fmt.token(kind, text))
        sent += 1
        sink.token(sent)
    await sink.write(fmt.end(len(pieces) + len(the_plan.tool_calls)))
    return "end"


_PAD_SIZE = 1 << 20
_pad_text: str | None = None


def _padded(token: str, width: int, n: int) -> str:
    """``token`` filled out to ``width`` characters with random letters, which compress about as
    poorly as real text (a repeated filler would let permessage-deflate hide any backpressure bug)."""
    global _pad_text
    if _pad_text is None:
        rng = random.Random(0)
        _pad_text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=_PAD_SIZE))
    fill = max(0, width - len(token) - 1)
    start = (n * fill) % (_PAD_SIZE - fill)
    return token + " " + _pad_text[start:start + fill]
