"""``/ws/chat``: the tutorial's text mode and the multiplexed JSON protocol on one route.

A text frame that parses as a JSON object with a string ``type`` is a protocol
message; anything else is a text-mode prompt. docs/protocol.md has the table of
message types. Each run is a :class:`~wsagent.engine.run.Run` driven by its own task; this
module only validates requests and wires runs to the connection's outbox.

A text prompt sent while an answer streams follows the connection's busy policy
(``/ws/chat?on_busy=...``, else ``--on-busy``, read at each prompt): see :meth:`ChatSession.text_prompt`.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..core.config import BUSY_POLICIES, Settings
from ..core.errors import ClusterUnavailable, ProtocolViolation
from ..core.events import Producer, Snapshot, encode, encode_message, json_object
from ..core.person import MAX_REASON
from ..core.render import TextMode
from ..engine.broker import scope_of
from ..engine.run import BadResume, NotAnswerable, ReplayGap, Run
from ..transport.connections import Connection
from ..upstream.completion import model_batches, tokens_for
from .app import App, MessageSession

__all__ = ["chat", "ChatSession", "CLOSE_BAD_POLICY"]

log = logging.getLogger("wsagent.chat")

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_MAX_ID = 128
#: ``/ws/chat?on_busy=<policy>`` names no policy.
CLOSE_BAD_POLICY = 1008
_INTERRUPTED = "interrupted by a new message"
_BUSY = "[ERROR] busy: an answer is still streaming (on_busy=reject); send again once it ends"
_NOT_STEERED = "[NOTE] not steered: a model's answer has no step to join; queued as the next prompt"


class ChatSession(MessageSession):
    """One /ws/chat connection: its text-mode history and busy policy, driven by its messages."""

    __slots__ = ("history", "history_size", "text_runs", "on_busy", "_answering")

    def __init__(self, app: App, conn: Connection) -> None:
        super().__init__(app, conn)
        self.history: list[dict[str, str]] = []  # a list: an empty deque costs 760 bytes per connection
        self.history_size = 0  # its characters
        self.text_runs = 0
        self.on_busy: str | None = None  # the connection's own policy; None: the server's, read at each prompt
        self._answering: list[Run] = []  # the text prompts not yet answered, oldest first

    @property
    def settings(self) -> Settings:
        """Read on every request, so a SIGHUP reload applies to open connections too."""
        return self.app.settings

    async def handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.reply_error(None, "bad_request", "binary frames are not supported; send JSON or text")
            return
        request = json_object(message)
        if request is not None and isinstance(request.get("type"), str):
            try:
                await self.handle_request(request)
            except (ProtocolViolation, ClusterUnavailable) as exc:
                rid = request.get("id")
                self.reply_error(rid if isinstance(rid, str) else None, exc.code, exc.message, exc.retryable)
        else:
            try:
                await self.text_prompt(message)
            except (ProtocolViolation, ClusterUnavailable) as exc:
                self.reply(f"[ERROR] {exc.message}")

    # -- replies ---------------------------------------------------------

    def reply(self, frame: str) -> None:
        self.conn.put(frame)

    @staticmethod
    def refuse(code: str, text: str, refused: str | bytes) -> str:
        return encode_message("error", code=code, message=text, retryable=True)

    def reply_error(self, run_id: str | None, code: str, message: str, retryable: bool = False) -> None:
        """A refused request: an ``error`` with the run id it named but no ``seq`` (no run exists)."""
        self.reply(encode_message("error", id=run_id, code=code, message=message, retryable=retryable))

    # -- text mode -------------------------------------------------------

    async def text_prompt(self, prompt: str) -> None:
        """Answer ``prompt`` with the history. While an earlier prompt is still being answered, the policy
        decides: ``enqueue`` answers it next; ``reject`` refuses it (the answer goes on untouched);
        ``interrupt`` cancels every earlier answer first; ``steer`` enqueues it with a note, since a model's
        answer has no step for it to join."""
        settings = self.app.settings  # (once: a property read three times a prompt)
        policy = self.on_busy or settings.on_busy
        if self._answering and policy == "reject":
            self.reply(_BUSY)
            return
        if self._answering and policy == "interrupt":
            await self._interrupt()
        refusal = await self.app.admit(self.conn, settings.max_runs_per_connection)
        if refusal is not None:
            self.reply(f"[ERROR] {refusal[1]}")
            return
        scope = scope_of(self.conn.user, self.conn.id)
        while True:  # a JSON run may have taken the name first
            self.text_runs += 1
            run_id = f"text-{self.conn.id}-{self.text_runs}"
            if await self.app.existing_run(scope, run_id) is None:
                break
        run = await self.app.new_run(self.conn, run_id, grace=settings.resume_grace)
        answering = self._answering
        previous = answering[-1] if answering else None
        if previous is not None and policy == "steer":
            self.reply(_NOT_STEERED)
        answering.append(run)
        run.prompt_estimate = tokens_for(self.history_size + len(prompt), len(self.history) + 1)
        reply: list[str] = []

        def ask() -> Producer:
            """Made when the previous prompt has been answered: its reply is in the history by then."""
            return model_batches(self.app.upstream, [*self.history, {"role": "user", "content": prompt}],
                                 collect=reply, collect_chars=self.app.settings.history_chars)

        def answered(done: Run) -> None:
            answering.remove(done)
            if done.outcome == "done":  # an answer cancelled or failed is not remembered
                self._remember(prompt, "".join(reply))

        run.on_finish.append(answered)
        self.app.start(self.conn, run, ask, model=self.app.upstream.config.model, after=previous)
        # Text mode shows no start frame: watching from after it, the socket has nothing to write until the answer
        # does (a write for nothing cost 17,000 instructions, 2 % of a one-token run's, scripts/instructions.py).
        run.subscribe(self.conn.outbox, run.sealed_seq, TextMode(), primary=True)

    async def _interrupt(self) -> None:
        """Cancel every answer not yet given and wait until each has ended: they end at once (a model's
        answer stops at its next read), so the new prompt's answer comes after their ``[CANCELLED]`` frames
        and is admitted without them (``--max-runs-per-connection``)."""
        runs = list(self._answering)
        for run in runs:
            run.cancel(_INTERRUPTED)
        for run in runs:
            await run.wait()

    def _remember(self, prompt: str, reply: str) -> None:
        """Keep the exchange, trimming the oldest turns to the history's bounds. A reply longer than
        ``history_chars`` (collected only up to there) does not fit at all: the history is left empty."""
        history = self.history
        history.append({"role": "user", "content": prompt})
        history.append({"role": "assistant", "content": reply})
        self.history_size += len(prompt) + len(reply)
        settings = self.app.settings
        most, chars = settings.history_messages, settings.history_chars
        while history and (len(history) > most or self.history_size > chars):
            self.history_size -= len(history.pop(0)["content"])

    # -- JSON protocol ---------------------------------------------------

    async def handle_request(self, request: dict[str, Any]) -> None:
        kind = request["type"]
        if kind == "ping":
            self.reply(encode_message("pong", id=request.get("id") if isinstance(request.get("id"), str) else None))
        elif kind == "run":
            await self.start_run(request)
        elif kind == "cancel":
            await self.cancel(request)
        elif kind == "resume":
            await self.resume(request)
        elif kind == "attach":
            await self.attach(request)
        elif kind == "approve":
            await self.approve(request)
        elif kind == "steer":
            await self.steer(request)
        else:
            raise ProtocolViolation(f"unknown message type {kind!r}")

    async def start_run(self, request: dict[str, Any]) -> None:
        run_id = _run_id(request)
        if await self.app.existing_run(scope_of(self.conn.user, self.conn.id), run_id) is not None:
            raise ProtocolViolation(f"run id {run_id!r} is already in use")
        refusal = await self.app.admit(self.conn, self.settings.max_runs_per_connection)
        if refusal is not None:
            self.reply_error(run_id, *refusal, True)
            return
        messages = _messages(request)
        run, producer, model = await self.app.open_run(
            self.conn, run_id, messages, model=request.get("model"), agent=request.get("agent"),
            workflow=request.get("workflow"), params=request.get("params"), grace=self.settings.resume_grace)
        run.subscribe(self.conn.outbox, 0, primary=True)
        self.app.start(self.conn, run, lambda: producer, model=model)

    async def find(self, request: dict[str, Any]) -> tuple[str, Run | None]:
        """The run a request names: by its ``key`` (from any socket; a user's run for that user only),
        or without one by ``id`` among the client's own (its user's, or anonymously its socket's)."""
        run_id = _run_id(request)
        key = request.get("key")
        if key is None:
            return run_id, await self.app.broker.run_by_id(scope_of(self.conn.user, self.conn.id), run_id)
        if not isinstance(key, str):
            raise ProtocolViolation("'key' must be a string (the key of the run's start event)")
        run = await self.app.broker.run_by_key(key)
        if run is None or run.id != run_id or (run.user is not None and run.user != self.conn.user):
            return run_id, None
        return run_id, run

    async def cancel(self, request: dict[str, Any]) -> None:
        run_id, run = await self.find(request)
        if run is None or run.finished:
            self.reply_error(run_id, "unknown_run", f"no run {run_id!r} in flight that you may cancel")
            return
        agent = request.get("agent")
        if agent is not None:
            if not isinstance(agent, str) or not await self.app.broker.cancel_agent(run, agent):
                self.reply_error(run_id, "unknown_agent", f"no agent {agent!r} running in run {run_id!r}")
            return
        if not await self.app.broker.cancel(run.key, "cancelled by client"):  # it ended meanwhile, or elsewhere
            self.reply_error(run_id, "unknown_run", f"no run {run_id!r} in flight that you may cancel")

    async def approve(self, request: dict[str, Any]) -> None:
        """``{"type": "approve", "id", "key"?, "call_id", "approved", "reason"?}``: a person's answer to an
        approval request. Whoever may cancel the run may answer (its own user or socket, or the key's holder);
        the answer reaches every watcher as an ``approval`` event, and a refusal only this socket."""
        call_id, approved, reason = request.get("call_id"), request.get("approved"), request.get("reason")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= _MAX_ID:
            raise ProtocolViolation(f"'call_id' must be a string of 1 to {_MAX_ID} characters (the approval "
                                    "request's)")
        if not isinstance(approved, bool):
            raise ProtocolViolation("'approved' must be true or false")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
            raise ProtocolViolation(f"'reason' must be a string of at most {MAX_REASON} characters")
        run_id, run = await self.find(request)
        if run is None:
            self.reply_error(run_id, "unknown_run", _unknown(run_id, "answer for", request))
            return
        watching = next((sub for sub in self.conn.outbox.subscriptions if sub.run is run), None)
        try:
            await self.app.broker.approve(run, call_id, approved, reason or None, watching)
        except NotAnswerable as exc:
            self.reply_error(run_id, exc.code, exc.message)

    async def steer(self, request: dict[str, Any]) -> None:
        """``{"type": "steer", "id", "key"?, "content"}``: a message for an agent run's next step. It reaches
        every watcher as a ``steer`` event: ``delivered`` true once the agent took it, false (with a
        ``reason``) if the run ended first; a run that cannot take it refuses at once."""
        content = request.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ProtocolViolation("'content' must be a non-empty string")
        if len(content) > self.settings.history_chars:
            raise ProtocolViolation(f"'content' may hold at most {self.settings.history_chars} characters "
                                    "(--history-chars)")
        run_id, run = await self.find(request)
        if run is None:
            self.reply_error(run_id, "unknown_run", _unknown(run_id, "steer", request))
            return
        try:
            await self.app.broker.steer(run, content)
        except NotAnswerable as exc:
            self.reply_error(run_id, exc.code, exc.message)

    async def resume(self, request: dict[str, Any]) -> None:
        after = request.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ProtocolViolation("'after' must be a non-negative integer (the last seq you received)")
        run_id, run = await self.find(request)
        if run is None:
            self.reply_error(run_id, "unknown_run", _unknown(run_id, "resume", request))
            return
        run = await self.app.broker.follow(run, after)
        if self._watching(run_id, run):
            return
        try:
            run.subscribe(self.conn.outbox, after, primary=not run.finished)
        except (ReplayGap, BadResume) as exc:
            self.reply_error(run_id, exc.code, exc.message)

    async def attach(self, request: dict[str, Any]) -> None:
        after = request.get("after")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise ProtocolViolation("'after' must be a non-negative integer (the last seq you received)")
        run_id, run = await self.find(request)
        if run is None:
            self.reply_error(run_id, "unknown_run", _unknown(run_id, "attach to", request))
            return
        run = await self.app.broker.follow(run, after or 0)
        if self._watching(run_id, run):
            return
        snapshot = await self.app.broker.snapshot(run) if after is None else None
        if snapshot is not None:
            self.reply(encode(Snapshot(snapshot, workflow=run.workflow), run.id, None))
        try:
            run.subscribe(self.conn.outbox, run.oldest_kept - 1 if after is None else after)
        except (ReplayGap, BadResume) as exc:
            self.reply_error(run_id, exc.code, exc.message)

    def _watching(self, run_id: str, run: Run) -> bool:
        """Whether this socket watches ``run`` already as JSON (refused: a second watch sent every event twice,
        the terminal one too; its events come here once, in order, so there is nothing to resume). A text-mode
        prompt's run may be attached to as JSON from its own socket: another view of it, not the same twice."""
        if not any(sub.run is run and sub.renderer is None and not sub.ended for sub in self.conn.outbox.subscriptions):
            return False
        self.reply_error(run_id, "already_watching", f"this socket watches run {run_id!r} already: its events "
                         "come here once, in order (a second resume or attach would send them twice)")
        return True


def _on_busy(conn: Connection) -> str | None:
    """The busy policy ``/ws/chat?on_busy=<policy>`` chose; None without the parameter (the server's)."""
    assert conn.ws.request is not None
    values = parse_qs(urlsplit(conn.ws.request.path).query, keep_blank_values=True).get("on_busy")
    if values is None:
        return None
    if len(values) != 1 or values[0] not in BUSY_POLICIES:
        raise ProtocolViolation(f"on_busy must be one of {', '.join(BUSY_POLICIES)}")
    return values[0]


def _unknown(run_id: str, verb: str, request: dict[str, Any]) -> str:
    """Why no run was found: with a key, the key matched no run of that id the client may see; without
    one, the id is looked up among the client's own runs only."""
    if "key" in request:
        return f"no run {run_id!r} with that key to {verb} (it ended and was forgotten, or the key is another run's)"
    return f"no run {run_id!r} of yours to {verb} (never started or forgotten; another socket's run needs its key)"


def _run_id(request: dict[str, Any]) -> str:
    run_id = request.get("id")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= _MAX_ID:
        raise ProtocolViolation(f"'id' must be a string of 1 to {_MAX_ID} characters")
    return run_id


def _messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    messages = request.get("messages")
    prompt = request.get("prompt")
    if messages is None:
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolViolation("a run needs 'messages' (a list) or 'prompt' (a string)")
        return [{"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not messages:
        raise ProtocolViolation("'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ProtocolViolation(f"each message needs a role, one of {sorted(_ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ProtocolViolation("a message's content must be a string or a list of parts")
    return messages


def chat(app: App, conn: Connection) -> ChatSession:
    """/ws/chat's session. A query that names no busy policy gets a line the client can show, then the
    close (the session handles nothing more: its connection is closing)."""
    session = ChatSession(app, conn)
    try:
        session.on_busy = _on_busy(conn)
    except ProtocolViolation as exc:
        session.reply(f"[ERROR] {exc.message}")
        conn.close_soon(CLOSE_BAD_POLICY, "Invalid on_busy", flush=True)
    return session
