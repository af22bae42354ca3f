"""The Responses API's background responses, in OpenAI's wire format.

``POST /v1/responses`` with ``"background": true`` starts the answer as a task of the simulator's own, apart
from the HTTP connection: its events are generated once, paced at the answer's rate, and kept in memory under
the response's id (:class:`Kept`). With ``"stream": true`` that request's connection streams them as they come;
when it goes (the client leaves, or ``drop_after`` cuts it), the generation goes on.
``GET /v1/responses/{id}?stream=true&starting_after=N`` streams the kept events after N, then the live ones,
until the terminal event; without ``stream`` it answers the response object as it stands.
``POST /v1/responses/{id}/cancel`` stops a response still queued or in progress: its streams end with no
further event (the openai SDK knows no ``response.cancelled`` event; its strict validation rejects one), and
the response object, from then on, says ``cancelled``.

At most ``SimulatorSettings.background_kept`` responses are kept: a new one forgets the oldest finished
one; when all of them are still running, it is refused with a 429.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import web

from .play import play
from .responses_format import ResponsesFormat
from .stats import BackgroundStat, SimStats

__all__ = ["BackgroundResponses", "Kept"]

log = logging.getLogger(__name__)

_RUNNING = ("queued", "in_progress")
_RETRIEVALS_KEPT = 1000  # the latest, in a response's stats


class Kept:
    """One background response: its events (the index of each is its sequence number), its status, and the
    generation task that writes them."""

    def __init__(self, response_id: str, fmt: ResponsesFormat, streamed: bool, stat: BackgroundStat,
                 tag: dict[str, float] | None) -> None:
        self.id = response_id
        self.fmt = fmt
        self.events: list[str] = []
        fmt.keep(response_id, self.events)
        self.streamed = streamed
        self.stat = stat
        self.tag = tag
        self.status = "queued"
        self.final: dict[str, Any] | None = None
        #: with ``drop_after``: the sequence number before which the creating request's connection is cut
        self.drop_seq: int | None = None
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.status in _RUNNING

    def changed(self) -> asyncio.Event:
        """Set at the next change (a new event, or the end); take it before looking at the state."""
        return self._changed

    def notify(self) -> None:
        self.stat.events = len(self.events)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def finish(self, status: str, final: dict[str, Any]) -> None:
        self.status = self.stat.status = status
        self.final = final
        self.notify()

    def response(self) -> dict[str, Any]:
        """The ``response`` object: the terminal one once there is one, else as it stands."""
        return self.final if self.final is not None else self.fmt.snapshot(self.status)


class _Generation:
    """The :class:`~.play.Sink` of a background response: the events are in :attr:`Kept.events` already
    (:meth:`ResponsesFormat.keep`); readers are woken, and others get a turn at every event."""

    def __init__(self, kept: Kept, stats: SimStats) -> None:
        self.kept = kept
        self.stats = stats

    async def write(self, text: str) -> None:
        self.kept.notify()
        self.stats._notify()
        await asyncio.sleep(0)

    async def comment(self, text: str) -> None:
        """Comments are the wire's, not events: a background response keeps none."""

    def drop(self) -> bool:
        self.kept.drop_seq = len(self.kept.events)
        return False

    def token(self, sent: int) -> None:
        self.kept.stat.tokens = sent
        self.stats.tokens_sent += 1
        if self.kept.tag is not None:
            self.kept.tag["tokens"] = sent


class BackgroundResponses:
    """The kept background responses (at most ``limit``, the oldest finished forgotten first) and their routes."""

    def __init__(self, stats: SimStats, limit: int, rate: float) -> None:
        self.stats = stats
        self.limit = max(1, limit)
        self.rate = rate
        self.kept: dict[str, Kept] = {}

    def _make_room(self) -> bool:
        """Forget the oldest finished responses until a new one fits; False when all of them still run."""
        while len(self.kept) >= self.limit:
            oldest = next((kept for kept in self.kept.values() if not kept.running), None)
            if oldest is None:
                return False
            del self.kept[oldest.id]
            self.stats.background.pop(oldest.id, None)
        return True

    async def start(self, request: web.Request, fmt: ResponsesFormat, switches: dict[str, str],
                    streamed: bool) -> web.StreamResponse:
        """``POST /v1/responses`` with ``background``: start the generation; stream it, or answer it queued."""
        if not self._make_room():
            return error(429, f"{self.limit} background responses are in progress, the most the simulator keeps",
                         "rate_limit_error", code="rate_limit_exceeded")
        response_id = f"resp_{uuid.uuid4().hex}"
        stat = self.stats.background[response_id] = BackgroundStat()
        tag = self.stats.tags.setdefault(switches["tag"], {"tokens": 0, "streams": 0}) if "tag" in switches else None
        kept = Kept(response_id, fmt, streamed, stat, tag)
        self.kept[response_id] = kept
        kept.task = asyncio.get_running_loop().create_task(self._generate(kept, switches))
        if not streamed:
            return web.json_response(kept.response())
        return await self._follow(request, kept, -1, creator=True)

    async def _generate(self, kept: Kept, switches: dict[str, str]) -> None:
        fmt = kept.fmt
        try:
            kept.status = kept.stat.status = "in_progress"
            ending = await play(fmt, switches, self.rate, _Generation(kept, self.stats))
            final = fmt.final if fmt.final is not None else fmt.snapshot("failed")
            kept.finish(str(final["status"]) if ending == "end" else "failed", final)
        except asyncio.CancelledError:
            kept.finish("cancelled", fmt.snapshot("cancelled"))
        except Exception:  # a bug: the response fails, as a real one would, and the simulator goes on
            log.exception("background response %s failed", kept.id)
            failed = fmt.snapshot("failed")
            failed["error"] = {"code": "server_error", "message": "the simulator failed"}
            kept.finish("failed", failed)
        finally:
            self.stats._notify()

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/responses/{id}``: the response object, or with ``stream=true`` its events after
        ``starting_after``, kept then live, to the end."""
        kept = self._find(request)
        if kept is None:
            return _not_found(request)
        if request.query.get("stream", "false").lower() not in ("true", "1"):
            kept.stat.polls += 1
            self.stats._notify()
            return web.json_response(kept.response())
        if not kept.streamed:
            return error(400, f"Response '{kept.id}' was not created with stream=true, so it cannot be streamed.",
                         "invalid_request_error", param="stream")
        try:
            after = int(request.query.get("starting_after", "-1"))
        except ValueError:
            return error(400, "Invalid 'starting_after': expected an integer.", "invalid_request_error",
                         param="starting_after", code="invalid_type")
        kept.stat.retrievals.append(after)
        del kept.stat.retrievals[:-_RETRIEVALS_KEPT]
        self.stats._notify()
        return await self._follow(request, kept, after, creator=False)

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /v1/responses/{id}/cancel``: stop a response still running; answer the response object.
        Cancelling a cancelled one again answers it as it is (OpenAI: "idempotent"); one that finished
        otherwise cannot be cancelled (400)."""
        kept = self._find(request)
        if kept is None:
            return _not_found(request)
        if kept.running and kept.task is not None:
            kept.stat.cancelled = True
            kept.task.cancel()
            await asyncio.wait([kept.task])
            if kept.running:  # cancelled before it began: its coroutine never ran
                kept.finish("cancelled", kept.fmt.snapshot("cancelled"))
            self.stats._notify()
        elif kept.status != "cancelled":
            return error(400, f"Cannot cancel a {kept.status} response.", "invalid_request_error")
        return web.json_response(kept.response())

    def _find(self, request: web.Request) -> Kept | None:
        return self.kept.get(request.match_info["response_id"])

    async def _follow(self, request: web.Request, kept: Kept, after: int, creator: bool) -> web.StreamResponse:
        """Stream ``kept``'s events after sequence number ``after``: those kept, then each as it comes, until
        the response is over. The creating request's connection is cut where ``drop_after`` says."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        with self.stats.streaming(kept.tag) as streamed:
            await response.prepare(request)
            seq = max(after + 1, 0)
            while True:
                changed = kept.changed()
                while seq < len(kept.events):
                    if creator and kept.drop_seq == seq:
                        assert request.transport is not None
                        request.transport.abort()
                        streamed.finished = True
                        return response
                    await response.write(kept.events[seq].encode())
                    seq += 1
                if not kept.running:
                    break
                await changed.wait()
            await response.write_eof()
            streamed.finished = True
        return response

    async def close(self, app: web.Application | None = None) -> None:
        """Stop every generation (the simulator shuts down)."""
        tasks = [kept.task for kept in self.kept.values() if kept.task is not None and not kept.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None, *,
          param: str | None = None, code: str | None = None) -> web.Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers=headers)


def _not_found(request: web.Request) -> web.Response:
    return error(404, f"Response with id '{request.match_info['response_id']}' not found.", "invalid_request_error")
