"""One run over the JSON protocol (``/ws/chat``, ``/ws/secure``): its events shown as they come, reconnect
and resume after a drop, cancel on request, a person's answers to its approval requests; and what a watcher
that attaches is shown of a run."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .display import TERMINAL, Display

__all__ = ["ANSWER_REFUSALS", "Catchup", "REFUSED", "RunFailed", "StreamClient", "refused"]

#: Refusals of a person's answer (an error without seq in reply to ``approve``): noted, and the run goes on.
ANSWER_REFUSALS = frozenset({"unknown_call", "already_answered", "run_ended"})
#: Close codes that mean "no": connecting again cannot change the answer (a slow client's 4008 can).
REFUSED = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4009, 4029})


def refused(code: int | None) -> bool:
    """Whether a close with ``code`` refuses the client for good (see :data:`REFUSED`)."""
    return code is not None and (code in REFUSED or (4000 <= code < 5000 and code != 4008))


class RunFailed(Exception):
    """The run cannot go on (the server refused it, or it could not be resumed)."""


class Catchup:
    """What a watcher shows of a run it attaches to: what its owner saw, once.

    The server answers an ``attach`` with a snapshot (a workflow's agents' text so far) and then a replay
    of every event it still keeps. When the replay starts where the watcher's view does (the run's first
    event, or after what it has shown), the replay is the whole story and the snapshot is dropped. When the
    first events are no longer kept, the snapshot stands in for them if it says which events it covers
    (``after``), and the replay goes on after those; otherwise the watcher shows what is kept and says
    what is missing. Never the snapshot and the events it covers, which doubled every agent's text.
    """

    def __init__(self, note: Callable[[str], None], shown: int = 0) -> None:
        self.note = note
        self.shown = shown  # the last seq the watcher has shown already
        self.snapshot: dict[str, Any] | None = None
        self.settled = False
        self.covered = 0  # the events the snapshot stands in for

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The events to show for ``event`` (none, it, or the snapshot held back and it)."""
        seq = event.get("seq")
        if self.settled:
            return [] if isinstance(seq, int) and seq <= self.covered else [event]
        if event.get("type") == "snapshot":
            self.snapshot = event
            return []
        if not isinstance(seq, int):
            return [event]
        self.settled = True
        snapshot, self.snapshot = self.snapshot, None
        if seq <= self.shown + 1:
            return [event]
        if snapshot is not None and self.shown == 0:
            after = snapshot.get("after")
            if isinstance(after, int) and not isinstance(after, bool) and after >= seq - 1:
                self.covered = after
                return [snapshot] if seq <= after else [snapshot, event]
        missing = seq - 1 - self.shown
        if self.shown == 0:
            self.note(f"the first {missing} events of this run are no longer kept: it is shown from event {seq}")
        else:
            self.note(f"{missing} events of this run (after event {self.shown}) are no longer kept")
        return [event]


class StreamClient:
    """One run over the JSON protocol, with reconnect-and-resume and Ctrl-C cancellation.

    ``retries`` is one budget for the whole run (see ``python -m wsagent.client --help``): ``failures`` counts the
    reconnects since the run last brought a new event, and a refusal is never retried.
    """

    def __init__(self, url: str, token: str | None, display: Display, retries: int = 5, backoff: float = 0.5) -> None:
        self.url = url
        self.token = token
        self.display = display
        self.retries = retries
        self.backoff = backoff
        self.failures = 0
        self.ws: ClientConnection | None = None
        self.last_seq = 0
        self.cancel_requested = False
        self.on_start: Callable[[str, str | None], None] = _quiet
        #: Given every event of the run before it is shown (a :class:`~wsagent.client.person.Approver`'s).
        self.on_event: Callable[[dict[str, Any]], None] = _unheard
        self.unsent: list[dict[str, Any]] = []  # answers given while not connected: sent once resumed
        self.sending: set[asyncio.Task[None]] = set()

    async def _retry(self, why: str) -> None:
        """Wait before connecting again, or give up: the budget is spent."""
        if self.failures >= self.retries:
            raise RunFailed(f"{why}; gave up after {self.retries} retries")
        delay = min(8.0, self.backoff * 2**self.failures) * random.uniform(0.5, 1.0)
        self.failures += 1
        self.display.note(f"{why}; reconnecting in {delay:.1f}s… (retry {self.failures} of {self.retries})")
        await asyncio.sleep(delay)

    async def _connect(self) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        while True:
            try:
                return await connect(self.url, additional_headers=headers, open_timeout=10, max_size=None)
            except InvalidURI as exc:
                raise RunFailed(str(exc)) from None
            except InvalidStatus as exc:
                response = exc.response
                why = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
                body = bytes(response.body or b"").decode(errors="replace").strip().partition("\n")[0][:200]
                if body:
                    why += f": {body}"
                if 400 <= response.status_code < 500:
                    raise RunFailed(f"the server refused the connection: {why}") from None
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                why = f"cannot connect to {self.url}: {exc}"
            await self._retry(why)

    def cancel(self) -> None:
        """Ask the server to cancel the run (the first Ctrl-C)."""
        self.cancel_requested = True
        ws, run_id = self.ws, getattr(self, "run_id", None)
        if ws is not None and run_id is not None:
            asyncio.ensure_future(self._send_quietly(ws, {"type": "cancel", "id": run_id, "key": self.key}))

    def answer(self, call_id: str, approved: bool, reason: str | None = None) -> None:
        """A person's answer to the run's approval request ``call_id``: sent now, or once connected again."""
        message: dict[str, Any] = {"type": "approve", "id": self.run_id, "key": self.key, "call_id": call_id,
                                   "approved": approved}
        if reason:
            message["reason"] = reason
        ws = self.ws
        if ws is None:
            self.unsent.append(message)
            return
        task = asyncio.ensure_future(self._send_answer(ws, message))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send_answer(self, ws: ClientConnection, message: dict[str, Any]) -> None:
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:  # it never left: it goes on the next connection
            self.unsent.append(message)

    @staticmethod
    async def _send_quietly(ws: ClientConnection, message: dict[str, Any]) -> None:
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:
            pass

    def _attach(self) -> dict[str, Any]:
        """Watch the run again: after what was shown, or (nothing shown yet) from its snapshot and its start."""
        request = {"type": "attach", "id": self.run_id, "key": self.key}
        return {**request, "after": self.last_seq} if self.last_seq else request

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` and render its events; returns the terminal event."""
        self.run_id = request["id"]
        # The run's key, from its start event (or given to attach): it proves the run is ours on a new socket.
        self.key: str | None = request.get("key")
        watching = request["type"] == "attach"
        first = True
        while True:
            ws = self.ws = await self._connect()
            catchup = Catchup(self.display.note, self.last_seq) if watching else None
            heard = False  # whether this connection brought any event of the run
            # Dropped before the run's start event (no key yet): the run may never have been taken (a node
            # closed with 1012 as the request went out), or it was and its start was lost. Resume it by id
            # (a signed-in user's runs are found so); a run the server does not know is sent again.
            unstarted = not first and not watching and self.key is None
            try:
                if first:
                    await ws.send(json.dumps(request))
                    first = False
                elif watching:
                    await ws.send(json.dumps(self._attach()))
                elif unstarted:
                    await ws.send(json.dumps({"type": "resume", "id": self.run_id, "after": self.last_seq}))
                else:
                    await ws.send(json.dumps({"type": "resume", "id": self.run_id, "key": self.key,
                                              "after": self.last_seq}))
                if self.cancel_requested:
                    await ws.send(json.dumps({"type": "cancel", "id": self.run_id, "key": self.key}))
                while self.unsent:
                    await ws.send(json.dumps(self.unsent[0]))
                    del self.unsent[0]
                async for message in ws:
                    event = self._decode(message)
                    if event.get("id") != self.run_id:
                        continue
                    heard = True
                    if unstarted and "seq" not in event and event.get("code") == "unknown_run":
                        unstarted = False
                        await ws.send(json.dumps(request))
                        continue
                    if "seq" not in event and event.get("type") == "error":
                        if watching and event.get("code") in ("lagging", "replay_gap"):
                            # Dropped for falling behind, or what followed the last event shown is gone:
                            # watch on from the oldest event kept (the catch-up says what was missed).
                            if event.get("code") == "lagging":
                                self.display.note("fell behind the run; watching it again")
                            catchup = Catchup(self.display.note, self.last_seq)
                            await ws.send(json.dumps({"type": "attach", "id": self.run_id, "key": self.key}))
                            continue
                        if event.get("code") in ANSWER_REFUSALS:
                            self.display.note(f"the answer was not taken: {event.get('code')}: {event.get('message')}")
                            continue
                        raise RunFailed(self._refusal(event))
                    for shown in catchup.feed(event) if catchup is not None else (event,):
                        if self._show(shown, watching):
                            await ws.close()
                            return dict(shown)
            except ConnectionClosed:
                pass
            finally:
                self.ws = None
                await ws.close()
            closed = ws.protocol.close_rcvd
            code, reason = (closed.code, closed.reason) if closed is not None else (None, "")
            if refused(code):
                what = "closed the connection" if heard else "refused the connection"
                raise RunFailed(f"the server {what}: {code} {reason}".rstrip())
            closing = f"{code} {reason}".rstrip() if code else "no close frame"
            await self._retry(f"the server is restarting ({closing})" if code == 1012 else
                              f"connection lost ({closing})")

    def _decode(self, message: str | bytes) -> dict[str, Any]:
        try:
            event = json.loads(message)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise RunFailed(f"{self.url} does not speak wsagent's JSON protocol (it sent {message[:80]!r}); "
                            "use /ws/chat or /ws/secure")
        return event

    def _show(self, event: dict[str, Any], watching: bool) -> bool:
        """Render ``event`` unless it was shown before a reconnect; whether it ends the run."""
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return False
            self.last_seq = seq
            self.failures = 0  # the run moves: the retry budget is whole again
        elif event.get("type") == "snapshot" and isinstance(event.get("after"), int):
            self.last_seq = max(self.last_seq, event["after"])
        if event.get("type") == "start" and not watching:
            self.key = event.get("key")
            self.on_start(self.run_id, self.key)
        self.on_event(event)
        self.display.event(event)
        return event.get("type") in TERMINAL

    def _refusal(self, event: dict[str, Any]) -> str:
        """A refused request (an error with no seq), for a person."""
        code, message = event.get("code"), event.get("message")
        if code == "unknown_run" and self.key is not None:  # the server's text says to send the key: it was sent
            message = (f"no run {self.run_id!r} with that key (it never existed, has been forgotten, "
                       "or is another user's)")
        return f"{code}: {message}"


def _quiet(run_id: str, key: str | None) -> None:
    """Started: nothing to say."""


def _unheard(event: dict[str, Any]) -> None:
    """An event: nothing to do but show it."""
