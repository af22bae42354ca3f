"""``python -m wsagent.client``: a terminal client for ``/ws/chat`` (and ``/ws/secure``).

    python -m wsagent.client "What is backpressure?"
    echo "Summarize this" | python -m wsagent.client --json
    python -m wsagent.client --workflow market-analysis "Analyze TSLA"

Tokens render as they arrive; agent thoughts get a mark each (💭 thinking,
🔧 action, 👁 observation, ✅ answer); a workflow gets a live dashboard with
one panel per agent in a terminal, and elsewhere (or with --no-dashboard)
each agent's lines labelled with its name. --attach shows a run started
elsewhere as its owner sees it, each event once. Ctrl-C cancels the run, a
second Ctrl-C quits. Exit codes: 0 done, 1 error, 2 usage, 130 cancelled.

A refusal ends the client at once, with the server's reason on stderr and exit
code 1: an HTTP 4xx answer to the handshake, or a close with 1008, 4001 (bad
or missing token), 4003 (forbidden), 4009, 4029 (rate limit) or another code
that no retry can change (1002, 1003, 1007, 1009, 1010, 4000-4999 but 4008).
Any other drop (1006, 1011, 1012, 1013, a slow-client 4008, HTTP 5xx, a
network error) is retried with jittered exponential backoff (0.5 s doubling
to 8 s, each wait a random half to all of that) and the run resumed from the
last event received (the server needs ``--resume-grace``; in a cluster the
run resumes on whichever node the URL reaches: a node restarting closes its
clients with 1012 and keeps producing their runs, no grace needed). A run
dropped before its start event (no key yet) is asked for by id, and sent
again if the server does not know it. --retries is one
budget for the whole run, not per connection: each failed connect and each
connection that drops before bringing a new event of the run uses one, and
only new events of the run refill it (a run that keeps moving survives any
number of drops; a server that takes the connection and drops it at once is
tried --retries times more, then the client gives up with exit code 1).

Rendering uses rich (``pip install ".[client]"``); without it the
client falls back to plain text. The client's own notes (reconnecting…) go to
stderr when stdout is not a terminal: piped, stdout is the answer alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

__all__ = ["main", "StreamClient", "RunFailed"]

TERMINAL = {"done", "error", "cancelled"}
MARKS = {"thinking": "💭", "action": "🔧", "observation": "👁", "answer": "✅", "refusal": "⛔"}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
TEXT_KINDS = ("token", "answer", "thinking", "refusal")
#: Close codes that mean "no": connecting again cannot change the answer (a slow client's 4008 can).
REFUSED = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4009, 4029})


def refused(code: int | None) -> bool:
    """Whether a close with ``code`` refuses the client for good (see :data:`REFUSED`)."""
    return code is not None and (code in REFUSED or (4000 <= code < 5000 and code != 4008))


class RunFailed(Exception):
    """The run cannot go on (the server refused it, or it could not be resumed)."""


class Renderer(Protocol):
    """How the client shows a run: every event, a note of its own, and the end."""

    def event(self, event: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class JsonRenderer:
    """One raw event per line, for scripts."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def event(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        sys.stderr.write(text + "\n")

    def close(self) -> None:
        return None


class TextRenderer:
    """Tokens inline as they come; each thought kind starts a line with its mark.

    A workflow's agents each write their own lines, labelled with the agent's name. Concurrent agents never
    share a line: while one agent's line is open, the others' events wait, and are written in their order
    once that line ends (a newline in its text, a line of its own such as a tool call, or its end).
    """

    def __init__(self, out: TextIO, color: bool, notes: TextIO | None = None) -> None:
        self.out = out
        self.notes = notes  # where the client's own notes go: in the answer's stream (a terminal) when None
        self.line: tuple[str, str | None] | None = None  # the open line: the kind it shows, and whose it is
        self.held: dict[str, list[dict[str, Any]]] = {}  # other agents' events, while one agent's line is open
        self.usage: dict[str, Any] | None = None
        self.console: Any = None
        if color:
            try:
                from rich.console import Console
            except ImportError:
                pass
            else:
                self.console = Console(file=out, highlight=False, soft_wrap=True)

    def _write(self, text: str, style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(text, style=style, end="", markup=False)
        else:
            self.out.write(text)
        self.out.flush()

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "snapshot":  # each agent's text so far, as if it had just been said
            for agent in event.get("agents", []):
                origin = {"agent": agent.get("agent"), "workflow": event.get("workflow")}
                if agent.get("content"):
                    self.event({"type": "answer", "content": agent["content"], **origin})
                if agent.get("status") not in (None, "running"):
                    self.event({"type": "agent_end", "outcome": agent["status"], **origin})
            return
        agent = _speaker(event)
        if agent is not None and self.line is not None and self.line[1] not in (None, agent):
            self.held.setdefault(agent, []).append(event)
            return
        if agent is None and self.held and kind not in ("start", "usage"):
            self._release()
        self._show(event)
        if agent is not None and self.line is None:
            self._drain()

    def _drain(self) -> None:
        """No line is open: the waiting agents' events, each agent's in order, until one leaves a line open."""
        while self.line is None and self.held:
            for event in self.held.pop(next(iter(self.held))):
                self._show(event)

    def _release(self) -> None:
        """Everything held, now (the run ends)."""
        self._newline()
        while self.held:
            for event in self.held.pop(next(iter(self.held))):
                self._show(event)
            self._newline()

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        content = event.get("content", "")
        agent = _speaker(event)
        label = f"[{agent}] " if agent is not None else ""
        if kind in TEXT_KINDS:
            shown = "answer" if kind == "token" else str(kind)
            mark = MARKS.get(shown, "") if kind != "token" else ""
            style = "dim" if kind == "thinking" else None
            if agent is None:
                if self.line != (shown, None):
                    self._newline()
                    if mark:
                        self._write(f"{mark} ", "bold")
                    self.line = (shown, None)
                self._write(content, style)
                return
            for i, piece in enumerate(content.split("\n")):  # every line of an agent's text says whose it is
                if i:
                    self._write("\n")
                    self.line = None
                if piece:
                    if self.line != (shown, agent):
                        self._newline()
                        self._write(f"{mark} {label}".lstrip(), "bold")
                        self.line = (shown, agent)
                    self._write(piece, style)
        elif kind in ("action", "observation"):
            self._newline()
            style = "red" if event.get("is_error") else ("cyan" if kind == "action" else "green")
            self._write(f"{MARKS[kind]} {label}{content}\n", style)
        elif kind == "tool_call":
            self._newline()
            self._write(f"🔧 {label}{event.get('name')}({event.get('arguments')})\n", "cyan")
        elif kind == "agent_end":
            self._newline()
            self._write(f"■ {event.get('agent')}: {event.get('outcome')}\n", "bold")
        elif kind == "usage":
            self.usage = event
        elif kind == "error":
            self._newline()
            self._write(f"error [{event.get('code')}]: {event.get('message')}\n", "bold red")
        elif kind == "cancelled":
            self._newline()
            self._write(f"cancelled: {event.get('reason')}\n", "yellow")
        elif kind == "done":
            self._newline()

    def _newline(self) -> None:
        if self.line is not None:
            self._write("\n")
            self.line = None

    def note(self, text: str) -> None:
        if self.notes is not None:  # stdout is the answer alone (piped): a reconnect never splits it
            self.notes.write(text + "\n")
            self.notes.flush()
            return
        self._newline()
        self._write(text + "\n", "yellow")

    def close(self) -> None:
        self._release()


def _speaker(event: dict[str, Any]) -> str | None:
    """The workflow agent an event is from (None for a run that is not a workflow: it has one voice)."""
    agent = event.get("agent")
    return agent if event.get("workflow") and isinstance(agent, str) else None


class DashboardRenderer:
    """A live panel per agent of a concurrent workflow: status, tokens, a progress bar when the length is known.

    While streaming, the count is of frames received (the relay may merge tokens for a slow terminal);
    the model's own count replaces it when its usage arrives.
    """

    def __init__(self, out: TextIO, max_tokens: int | None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=out)
        self.max_tokens = max_tokens
        self.agents: dict[str, dict[str, Any]] = {}
        self.live = Live(self._render(), console=self.console, refresh_per_second=10, transient=False)
        self.live.start()

    def _agent(self, name: str) -> dict[str, Any]:
        return self.agents.setdefault(name, {"status": "running", "text": "", "tokens": 0, "thinking": ""})

    def event(self, event: dict[str, Any]) -> None:
        kind, name = event.get("type"), event.get("agent")
        if kind == "snapshot":
            for agent in event.get("agents", []):
                state = self._agent(agent["agent"])
                state.update(status=agent["status"], text=agent["content"])
        elif name is not None:
            state = self._agent(name)
            if kind == "answer":
                state["text"] += event.get("content", "")
                state["tokens"] += 1
            elif kind == "thinking":
                state["thinking"] = (state["thinking"] + event.get("content", ""))[-200:]
            elif kind == "action":
                state["thinking"] = f"🔧 {event.get('content')}"
            elif kind == "usage" and not event.get("estimated"):
                state["tokens"] = max(state["tokens"], int(event.get("completion_tokens", 0)))
            elif kind == "agent_end":
                state["status"] = event.get("outcome", "done")
        if kind in TERMINAL:  # the whole run ended: an agent still running was stopped with it
            self._settle("done" if kind == "done" else kind)
        self.live.update(self._render())

    def _settle(self, outcome: str) -> None:
        for state in self.agents.values():
            if state["status"] == "running":
                state["status"] = outcome

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        panels = []
        for name, state in self.agents.items():
            icon = {"running": "🔄", "done": "✅", "error": "❌", "cancelled": "⏹"}.get(state["status"], "•")
            header = Table.grid(expand=True, padding=(0, 1))
            header.add_column(no_wrap=True)
            if self.max_tokens:
                header.add_column(ratio=1)
                header.add_row(Text(f"{state['tokens']} tokens", style="dim"),
                               ProgressBar(total=self.max_tokens, completed=min(state["tokens"], self.max_tokens)))
            else:
                header.add_row(Text(f"{state['tokens']} tokens", style="dim"))
            body: list[Any] = [header]
            if state["thinking"] and state["status"] == "running":
                body.append(Text(state["thinking"][-120:], style="dim italic"))
            body.append(Text(state["text"][-600:]))
            panels.append(Panel(Group(*body), title=f"{icon} {name}", border_style="blue"))
        return Group(*panels) if panels else Text("waiting for agents…", style="dim")

    def note(self, text: str) -> None:
        self.console.print(text, style="yellow")

    def close(self) -> None:
        """The last frame, then the terminal back: no agent is left shown as running (a second Ctrl-C
        quits without waiting for the run's end)."""
        self._settle("cancelled")
        self.live.update(self._render(), refresh=True)
        self.live.stop()


class WatchRenderer:
    """A watcher's renderer, chosen by the run it watches (``--attach`` is not told what the run is): the
    live dashboard for a workflow, as its owner has it, text for anything else."""

    def __init__(self, choose: Callable[[dict[str, Any]], Renderer]) -> None:
        self.choose = choose
        self.chosen: Renderer | None = None

    def event(self, event: dict[str, Any]) -> None:
        if self.chosen is None:
            self.chosen = self.choose(event)
        self.chosen.event(event)

    def note(self, text: str) -> None:
        if self.chosen is not None:
            self.chosen.note(text)
        else:
            sys.stderr.write(text + "\n")

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()


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

    ``retries`` is one budget for the whole run (see the module's docstring): ``failures`` counts the
    reconnects since the run last brought a new event, and a refusal is never retried.
    """

    def __init__(self, url: str, token: str | None, renderer: Renderer, retries: int = 5, backoff: float = 0.5) -> None:
        self.url = url
        self.token = token
        self.renderer = renderer
        self.retries = retries
        self.backoff = backoff
        self.failures = 0
        self.ws: ClientConnection | None = None
        self.last_seq = 0
        self.cancel_requested = False
        self.on_start: Callable[[str, str | None], None] = _quiet

    async def _retry(self, why: str) -> None:
        """Wait before connecting again, or give up: the budget is spent."""
        if self.failures >= self.retries:
            raise RunFailed(f"{why}; gave up after {self.retries} retries")
        delay = min(8.0, self.backoff * 2**self.failures) * random.uniform(0.5, 1.0)
        self.failures += 1
        self.renderer.note(f"{why}; reconnecting in {delay:.1f}s… (retry {self.failures} of {self.retries})")
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
            catchup = Catchup(self.renderer.note, self.last_seq) if watching else None
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
                                self.renderer.note("fell behind the run; watching it again")
                            catchup = Catchup(self.renderer.note, self.last_seq)
                            await ws.send(json.dumps({"type": "attach", "id": self.run_id, "key": self.key}))
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
        self.renderer.event(event)
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


def _announcer(url: str, token: str | None) -> Callable[[str, str | None], None]:
    """Say, once the run has started, how to watch it from elsewhere (on stderr: stdout is the answer): the
    whole command, with the URL this client used (a token in its query string left out: no secrets)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    shown = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    needs_token = token is not None or len(query) < len(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))

    def announce(run_id: str, key: str | None) -> None:
        command = shlex.join(["python", "-m", "wsagent.client", "--url", shown, "--attach", run_id])
        hint = f"watch from another terminal: {command} --key={shlex.quote(key or '')}"
        sys.stderr.write(hint + ("  # with the same --token (or WSAGENT_TOKEN)\n" if needs_token else "\n"))

    return announce


def _parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="python -m wsagent.client", description=paragraphs[0],
                                     epilog="\n\n".join(p for p in paragraphs if p.startswith(("A refusal", "Tokens"))),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the prompt (read from stdin when piped)")
    parser.add_argument("--url", default=os.environ.get("WSAGENT_URL", "ws://localhost:8000/ws/chat"),
                        help="server route [WSAGENT_URL] (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("WSAGENT_TOKEN"),
                        help="JWT for secured routes, sent as Authorization: Bearer [WSAGENT_TOKEN]")
    parser.add_argument("--workflow", help="run a named workflow (in a terminal, a live panel per agent)")
    parser.add_argument("--agent", help="run a named agent (assistant)")
    parser.add_argument("--model", help="model name to ask the upstream for")
    parser.add_argument("--max-tokens", type=int, help="answer length limit (also sizes the progress bars)")
    parser.add_argument("--json", action="store_true", help="print raw events, one JSON object per line")
    parser.add_argument("--no-dashboard", action="store_true", help="workflows as plain text, not panels")
    parser.add_argument("--retries", type=int, default=5,
                        help="reconnects allowed without the run moving: one budget for the whole run, whole again "
                             "whenever a new event of the run arrives; a refusal is never retried (see below) "
                             "(default: %(default)s)")
    parser.add_argument("--attach", metavar="ID", help="watch run ID that another client started (needs --key), "
                                                       "as its owner sees it (a workflow's dashboard too)")
    parser.add_argument("--key", help="the key of the run to --attach to, as --key=KEY (a key may begin with -; "
                                      "its start event has it)")
    return parser


async def _main(args: argparse.Namespace, prompt: str) -> int:
    def text() -> Renderer:
        tty = sys.stdout.isatty()
        return TextRenderer(sys.stdout, color=tty, notes=None if tty else sys.stderr)

    def dashboard() -> Renderer:
        try:
            return DashboardRenderer(sys.stdout, args.max_tokens)
        except ImportError:
            return TextRenderer(sys.stdout, color=False)

    renderer: Renderer
    if args.json:
        renderer = JsonRenderer(sys.stdout)
    elif args.no_dashboard or not sys.stdout.isatty():
        renderer = text()
    elif args.workflow:
        renderer = dashboard()
    elif args.attach:  # the run says what it is: a workflow's events carry its name
        renderer = WatchRenderer(lambda event: dashboard() if event.get("workflow") else text())
    else:
        renderer = text()
    request: dict[str, Any]
    if args.attach:
        request = {"type": "attach", "id": args.attach, "key": args.key}
    else:
        request = {"type": "run", "id": f"cli-{uuid.uuid4().hex[:12]}", "prompt": prompt}
        for key in ("workflow", "agent", "model"):
            if getattr(args, key):
                request[key] = getattr(args, key)
        if args.max_tokens:
            request["params"] = {"max_tokens": args.max_tokens}
    client = StreamClient(args.url, args.token, renderer, retries=args.retries)
    if sys.stderr.isatty():
        client.on_start = _announcer(args.url, args.token)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def interrupt() -> None:
        if client.cancel_requested or args.attach:  # a watcher leaves; the run is someone else's
            main_task.cancel()
        else:
            renderer.note("cancelling… (Ctrl-C again to quit)")
            client.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        terminal = await client.run(request)
    except RunFailed as exc:
        renderer.close()
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR
    except asyncio.CancelledError:
        renderer.close()
        return EXIT_CANCELLED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    renderer.close()
    if terminal["type"] == "done":
        return EXIT_OK
    if terminal["type"] == "cancelled":
        return EXIT_CANCELLED
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.attach and not args.key:
        _parser().print_usage(sys.stderr)
        sys.stderr.write("error: --attach needs --key (the run's key: its start event has it)\n")
        return EXIT_USAGE
    prompt = args.prompt
    if prompt is None and not args.attach and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    if not prompt and not args.attach:
        _parser().print_usage(sys.stderr)
        sys.stderr.write("error: give a prompt as an argument or on stdin\n")
        return EXIT_USAGE
    return asyncio.run(_main(args, prompt or ""))


if __name__ == "__main__":
    sys.exit(main())
