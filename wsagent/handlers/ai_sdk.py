"""``/ws/ai-sdk``: the Vercel AI SDK's ``WebSocketChatTransport`` protocol, for ``useChat``.

Each ``send`` is a run like every other (merging, backpressure, budgets, limits,
metrics, the ``run`` log line), rendered as UI message chunks by
:class:`~wsagent.core.ui_stream.UIChunks`. Several chats stream at once on one
socket, each request routed by its ``requestId``.

A chat's current response is registered under the chat's id: an authenticated
user's chats among that user's runs, an anonymous chat under its own id (the
chat id is then what lets a page resume it: ``useChat`` makes ids of 16 random
characters). A response goes on for ``--ai-sdk-grace`` seconds after its socket
goes (a page reload) and is kept as long once it ended, so ``resume`` replays it
from its first chunk and follows it live.

A person in the loop (docs/person-in-the-loop.md): a response stops at an
approval request; the next ``send``, whose last message holds the answers
(``addToolApprovalResponse``), answers them and continues the same message. A
``send`` for a chat whose response still streams follows the busy policy
(``body.on_busy``, else ``--on-busy``): ``enqueue`` (it starts once the other
has ended), ``reject``, ``interrupt`` (the other is cancelled first) or
``steer`` (its last user text joins the running agent at its next step; a
model's answer cannot be steered, so it is enqueued). A new message while the
response waits for an approval abandons the approval, as ``useChat`` does:
the waiting run is cancelled.

Bad input: a frame that cannot be attributed to a request (not JSON, not an
object, no string ``requestId``) closes the socket with 1008, a binary frame
with 1003, as the transport's own server outline does; anything else wrong gets
an ``error`` frame for its ``requestId`` and touches no other chat.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..core.config import BUSY_POLICIES
from ..core.errors import ClusterUnavailable, ProtocolViolation
from ..core.events import encode_message, json_object
from ..core.ui_stream import UIChunks, approval_responses, chat_messages, last_user_text, message_id
from ..engine.broker import scope_of
from ..engine.run import NotAnswerable, Phase, ReplayGap, Run, Subscription
from ..transport.connections import Connection
from .app import App, MessageSession

__all__ = ["ai_sdk", "CLOSE_INVALID_FRAME", "CLOSE_BINARY_FRAME", "MAX_QUEUED"]

#: A frame that names no request.
CLOSE_INVALID_FRAME = 1008
#: A binary frame: the transport sends text only.
CLOSE_BINARY_FRAME = 1003
_MAX_ID = 128
#: Requests one chat may hold waiting for its response to end (``enqueue``), from all its sockets.
MAX_QUEUED = 4
#: How long an interrupted response may take to end before the new one starts anyway.
_INTERRUPT_LIMIT = 10.0


class AISDKSession(MessageSession):
    """One /ws/ai-sdk connection: the requests it streams and those waiting for their chat, driven by its
    messages."""

    __slots__ = ("requests", "queued", "queued_for")

    def __init__(self, app: App, conn: Connection) -> None:
        super().__init__(app, conn)
        self.requests: dict[str, Subscription] = {}  # requests streaming to this socket, for ``abort``
        self.queued: dict[str, asyncio.Task[None]] = {}  # requests waiting for their chat's response to end
        self.queued_for: dict[str, str] = {}  # the chat each of those waits for

    async def handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.conn.close_soon(CLOSE_BINARY_FRAME, "Binary frames are not supported")
            return
        frame = json_object(message)
        request_id = frame.get("requestId") if frame is not None else None
        if frame is None or not isinstance(request_id, str):
            self.conn.close_soon(CLOSE_INVALID_FRAME, "Invalid frame")
            return
        try:
            await self.handle_frame(frame, request_id)
        except (ProtocolViolation, ClusterUnavailable) as exc:
            self.error(request_id, exc.message)

    def on_close(self) -> None:
        """A queued request has nothing to resume: it goes with its socket (a running one has its grace)."""
        for task in list(self.queued.values()):
            task.cancel()
        super().on_close()

    @staticmethod
    def refuse(code: str, message: str, refused: str | bytes) -> str:
        frame = json_object(refused) if isinstance(refused, str) else None
        request_id = frame.get("requestId") if frame is not None else None
        return encode_message("error", requestId=request_id if isinstance(request_id, str) else "",
                              errorText=message)

    def error(self, request_id: str, text: str) -> None:
        self.conn.put(encode_message("error", requestId=request_id, errorText=text))

    async def handle_frame(self, frame: dict[str, Any], request_id: str) -> None:
        kind = frame.get("type")
        if kind == "abort":
            await self.abort(request_id)
            return
        if kind not in ("send", "resume"):
            raise ProtocolViolation(f"unknown frame type {kind!r}: send, resume or abort")
        if not 0 < len(request_id) <= _MAX_ID:
            raise ProtocolViolation(f"'requestId' must be 1 to {_MAX_ID} characters")
        chat_id = frame.get("id")
        if not isinstance(chat_id, str) or not 0 < len(chat_id) <= _MAX_ID:
            raise ProtocolViolation(f"'id' (the chat's id) must be a string of 1 to {_MAX_ID} characters")
        if (request_id in self.requests and not self.requests[request_id].ended) or request_id in self.queued:
            raise ProtocolViolation(f"request {request_id!r} is already streaming")
        scope, run_id = self._where(chat_id)
        if kind == "resume":
            await self.resume(request_id, scope, run_id)
        else:
            await self.send(frame, request_id, scope, run_id)

    def _where(self, chat_id: str) -> tuple[str, str]:
        """Where a chat's response is registered: (scope, run id)."""
        user = self.conn.user
        return (scope_of(user, self.conn.id) if user is not None else f"ai-sdk:{chat_id}"), f"ai-sdk:{chat_id}"

    def _watch(self, request_id: str, run: Run, primary: bool, continues: frozenset[str] = frozenset()) -> None:
        sub = run.subscribe(self.conn.outbox, 0, UIChunks(request_id, message_id(run.key), continues),
                            primary=primary, pauses=True, answered=continues)
        self.requests = {rid: s for rid, s in self.requests.items() if not s.ended}
        self.requests[request_id] = sub

    async def send(self, frame: dict[str, Any], request_id: str, scope: str, run_id: str) -> None:
        if frame.get("trigger") not in ("submit-message", "regenerate-message"):
            raise ProtocolViolation("'trigger' must be submit-message or regenerate-message")
        body = frame.get("body")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ProtocolViolation("'body' must be an object")
        policy = body.get("on_busy", self.app.settings.on_busy)
        if policy not in BUSY_POLICIES:
            raise ProtocolViolation(f"'on_busy' must be one of {', '.join(BUSY_POLICIES)}")
        answers = approval_responses(frame.get("messages"))
        messages = [] if answers else chat_messages(frame.get("messages"))
        app = self.app
        previous = await app.existing_run(scope, run_id)
        if previous is not None:  # (produced on another node: its copy says whether it has ended)
            previous = await app.broker.follow(previous)
        if answers:
            await self.answer(request_id, previous, answers)
            return
        if previous is not None and (not previous.finished or app.waiting[f"{scope}\x00{run_id}"]):
            # (busy too while a request waits its turn: a response cancelled before it began ends at once)
            if previous.phase is Phase.WAITING:  # a new message abandons the approval, as useChat does
                policy = "interrupt"
            if policy == "reject":
                raise ProtocolViolation("a response is already streaming for this chat (on_busy=reject); "
                                        "abort it first")
            if policy == "steer" and await self._steer(request_id, previous, messages):
                return
            await self._enqueue(previous, request_id, scope, run_id, messages, body, policy)
            return
        await self._start(request_id, scope, run_id, messages, body, previous)

    async def _enqueue(self, previous: Run, request_id: str, scope: str, run_id: str, messages: list[dict[str, Any]],
                       body: dict[str, Any], policy: str) -> None:
        """Wait for the chat's response to end (cancelled first, to ``interrupt``), then start. A waiting request
        counts against its socket's runs in flight, and a chat holds at most :data:`MAX_QUEUED` of them."""
        app = self.app
        chat = f"{scope}\x00{run_id}"
        if policy == "interrupt":  # every answer not yet given for the chat: the running one, and those queued here
            for older in [rid for rid, waits in self.queued_for.items() if waits == chat]:
                await self._drop(older)
            await app.broker.cancel(previous.key, "interrupted by a new message")
        limit = app.settings.max_runs_per_connection
        refusal = await app.admit(self.conn, limit, len(self.queued))
        if refusal is not None:
            raise ProtocolViolation(refusal[1])
        if app.waiting[chat] >= MAX_QUEUED:
            raise ProtocolViolation(f"at most {MAX_QUEUED} messages may be waiting for this chat's response")
        app.waiting[chat] += 1
        task = asyncio.get_running_loop().create_task(self._after(previous, request_id, scope, run_id, messages, body))
        self.queued[request_id] = task
        self.queued_for[request_id] = chat

        def done(_task: asyncio.Task[None]) -> None:
            self.queued.pop(request_id, None)
            self.queued_for.pop(request_id, None)
            app.waiting[chat] -= 1
            if not app.waiting[chat]:
                del app.waiting[chat]

        task.add_done_callback(done)

    async def _after(self, previous: Run, request_id: str, scope: str, run_id: str,
                     messages: list[dict[str, Any]], body: dict[str, Any]) -> None:
        """Start the request once the chat's response has ended, and any queued before it (an interrupted
        one ends at once; one that does not within a bound is left to its budget, and this request refused)."""
        try:  # (the chat's response now: a request queued before this one may have started since)
            current = await self.app.existing_run(scope, run_id)
            if current is not None:
                current = await self.app.broker.follow(current)
            while current is not None and not current.finished:
                if current.phase is Phase.INTERRUPTED:
                    async with asyncio.timeout(_INTERRUPT_LIMIT):
                        await current.wait()
                else:
                    await current.wait()
                previous = current
                current = await self.app.existing_run(scope, run_id)
                if current is not None:
                    current = await self.app.broker.follow(current)
            await self._start(request_id, scope, run_id, messages, body, current or previous)
        except (ProtocolViolation, ClusterUnavailable) as exc:
            self.error(request_id, exc.message)
        except TimeoutError:
            self.error(request_id, "the response this message interrupts did not end; try again")

    async def _steer(self, request_id: str, previous: Run, messages: list[dict[str, Any]]) -> bool:
        """Send the request's last user text to the running agent; True if it took it (a ``data-steer``
        chunk says so, then the request ends; the agent's run reports the delivery)."""
        text = last_user_text(messages)
        if not text:
            return False
        try:
            await self.app.broker.steer(previous, text)
        except NotAnswerable as exc:
            if exc.code == "not_steerable":
                return False
            raise ProtocolViolation(exc.message) from None
        chunks = UIChunks(request_id, message_id(previous.key))
        frames: list[str] = []
        chunks.steered(frames, text)
        for frame in frames:
            self.conn.put(frame)
        return True

    async def answer(self, request_id: str, previous: Run | None, answers: list[tuple[str, bool, str | None]]
                     ) -> None:
        """Answer the chat's approval requests and continue its waiting response on this request."""
        if previous is None or previous.finished:
            raise ProtocolViolation("no response of this chat is waiting for these approvals (it ended: "
                                    "see --approval-timeout); send your message again")
        for call_id, approved, reason in answers:
            try:
                await self.app.broker.approve(previous, call_id, approved, reason)
            except NotAnswerable as exc:
                if exc.code != "already_answered":  # (a page that sent its answers twice: the first stands)
                    raise ProtocolViolation(exc.message) from None
        try:
            self._watch(request_id, previous, primary=True, continues=frozenset(c for c, _, _ in answers))
        except ReplayGap:
            self.error(request_id, "this response is too long to continue from its start (see --replay-bytes)")

    async def _start(self, request_id: str, scope: str, run_id: str,
                     messages: list[dict[str, Any]], body: dict[str, Any], previous: Run | None) -> None:
        app = self.app
        refusal = await app.admit(self.conn, app.settings.max_runs_per_connection)
        if refusal is not None:
            raise ProtocolViolation(refusal[1])
        if previous is not None:
            app.broker.forget(previous)
        run, producer, model = await app.open_run(
            self.conn, run_id, messages, model=body.get("model"), agent=body.get("agent"),
            workflow=body.get("workflow"), params=body.get("params"), grace=app.settings.ai_sdk_grace, scope=scope)
        self._watch(request_id, run, primary=True)
        app.start(self.conn, run, lambda: producer, model=model)

    async def resume(self, request_id: str, scope: str, run_id: str) -> None:
        run = await self.app.broker.run_by_id(scope, run_id)
        if run is None:
            self.conn.put(encode_message("no-active", requestId=request_id))
            return
        run = await self.app.broker.follow(run)
        self.conn.put(encode_message("start", requestId=request_id))
        try:
            self._watch(request_id, run, primary=not run.finished)
        except ReplayGap:
            self.error(request_id, "this response is too long to replay from its start (see --replay-bytes)")

    async def abort(self, request_id: str) -> None:
        """Cancel the run this request streams (whoever started it): the model server sees its
        connection close. An abort for a request that is not streaming here does nothing."""
        if await self._drop(request_id):
            return
        sub = self.requests.pop(request_id, None)
        if sub is not None and not sub.run.finished:
            await self.app.broker.cancel(sub.run.key, "aborted by client")

    async def _drop(self, request_id: str) -> bool:
        """End a queued request before it starts (an ``end``, nothing streamed); False if it is not queued here."""
        waiting = self.queued.pop(request_id, None)
        if waiting is None:
            return False
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        self.conn.put(encode_message("end", requestId=request_id))
        return True


def ai_sdk(app: App, conn: Connection) -> AISDKSession:
    """/ws/ai-sdk's session."""
    return AISDKSession(app, conn)
