"""``python -m wsagent.client``: a terminal client for ``/ws/chat`` (and ``/ws/secure``).

    python -m wsagent.client "What is backpressure?"
    echo "Summarize this" | python -m wsagent.client --json
    python -m wsagent.client --workflow market-analysis "Analyze TSLA"

Tokens render as they arrive; agent thoughts get a mark each (💭 thinking,
🔧 action, 👁 observation, ✅ answer); a concurrent workflow gets a live
dashboard with one panel per agent. Ctrl-C cancels the run, a second Ctrl-C
quits. A dropped connection is retried with backoff and the run resumed from
the last event received (the server needs ``--resume-grace``). Exit codes: 0
done, 1 error, 2 usage, 130 cancelled.

Rendering uses rich (``pip install "wsagent[client]"``); without it the
client falls back to plain text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

__all__ = ["main", "StreamClient", "RunFailed"]

TERMINAL = {"done", "error", "cancelled"}
MARKS = {"thinking": "💭", "action": "🔧", "observation": "👁", "answer": "✅", "refusal": "⛔"}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


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
    """Tokens inline as they come; each thought kind starts a line with its mark."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.kind: str | None = None
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
        content = event.get("content", "")
        agent = f"[{event['agent']}] " if event.get("workflow") and event.get("agent") else ""
        if kind in ("token", "answer", "thinking", "refusal"):
            shown = "answer" if kind == "token" else kind
            if shown != self.kind:
                self._newline()
                mark = MARKS.get(shown, "") if kind != "token" else ""
                if mark or agent:
                    self._write(f"{mark} {agent}".lstrip(), "bold")
                self.kind = shown
            self._write(content, "dim" if kind == "thinking" else None)
        elif kind in ("action", "observation"):
            self._newline()
            style = "red" if event.get("is_error") else ("cyan" if kind == "action" else "green")
            self._write(f"{MARKS[kind]} {agent}{content}\n", style)
            self.kind = None
        elif kind == "tool_call":
            self._newline()
            self._write(f"🔧 {event.get('name')}({event.get('arguments')})\n", "cyan")
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
        if self.kind is not None:
            self._write("\n")
            self.kind = None

    def note(self, text: str) -> None:
        self._newline()
        self._write(text + "\n", "yellow")

    def close(self) -> None:
        self._newline()


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


class StreamClient:
    """One run over the JSON protocol, with reconnect-and-resume and Ctrl-C cancellation."""

    def __init__(self, url: str, token: str | None, renderer: Renderer, retries: int = 5, backoff: float = 0.5) -> None:
        self.url = url
        self.token = token
        self.renderer = renderer
        self.retries = retries
        self.backoff = backoff
        self.ws: ClientConnection | None = None
        self.last_seq = 0
        self.cancel_requested = False
        self.on_start: Callable[[str, str | None], None] = _quiet

    async def _connect(self) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        attempt = 0
        while True:
            try:
                return await connect(self.url, additional_headers=headers, open_timeout=10, max_size=None)
            except InvalidStatus as exc:
                if exc.response.status_code not in (429, 503) or attempt >= self.retries:
                    raise RunFailed(f"server refused the connection: HTTP {exc.response.status_code}") from None
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                if attempt >= self.retries:
                    raise RunFailed(f"cannot connect to {self.url}: {exc}") from None
            delay = min(8.0, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            self.renderer.note(f"reconnecting in {delay:.1f}s…")
            await asyncio.sleep(delay)
            attempt += 1

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

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` and render its events; returns the terminal event."""
        self.run_id = request["id"]
        # The run's key, from its start event (or given to attach): it proves the run is ours on a new socket.
        self.key: str | None = request.get("key")
        watching = request["type"] == "attach"
        first = True
        while True:
            ws = self.ws = await self._connect()
            try:
                if first:
                    await ws.send(json.dumps(request))
                    first = False
                else:
                    await ws.send(json.dumps({"type": "attach" if watching else "resume", "id": self.run_id,
                                              "key": self.key, "after": self.last_seq}))
                if self.cancel_requested:
                    await ws.send(json.dumps({"type": "cancel", "id": self.run_id, "key": self.key}))
                async for message in ws:
                    event = json.loads(message)
                    if event.get("id") != self.run_id:
                        continue
                    if "seq" not in event and event.get("type") == "error":
                        raise RunFailed(f"{event.get('code')}: {event.get('message')}")
                    seq = event.get("seq")
                    if isinstance(seq, int):
                        if seq <= self.last_seq:
                            continue
                        self.last_seq = seq
                    if event.get("type") == "start" and not watching:
                        self.key = event.get("key")
                        self.on_start(self.run_id, self.key)
                    self.renderer.event(event)
                    if event.get("type") in TERMINAL:
                        await ws.close()
                        return dict(event)
                raise ConnectionClosed(None, None)
            except ConnectionClosed:
                self.renderer.note("connection lost; resuming…")
            finally:
                self.ws = None
                await ws.close()


def _quiet(run_id: str, key: str | None) -> None:
    """Started: nothing to say."""


def _announce(run_id: str, key: str | None) -> None:
    """Say, once the run has started, how to watch it from elsewhere (on stderr: stdout is the answer)."""
    sys.stderr.write(f"watch from another terminal: python -m wsagent.client --attach {run_id} --key={key}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wsagent.client", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="the prompt (read from stdin when piped)")
    parser.add_argument("--url", default=os.environ.get("WSAGENT_URL", "ws://localhost:8000/ws/chat"),
                        help="server route [WSAGENT_URL] (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("WSAGENT_TOKEN"),
                        help="JWT for secured routes, sent as Authorization: Bearer [WSAGENT_TOKEN]")
    parser.add_argument("--workflow", help="run a named workflow (a live dashboard for concurrent ones)")
    parser.add_argument("--agent", help="run a named agent (assistant)")
    parser.add_argument("--model", help="model name to ask the upstream for")
    parser.add_argument("--max-tokens", type=int, help="answer length limit (also sizes the progress bars)")
    parser.add_argument("--json", action="store_true", help="print raw events, one JSON object per line")
    parser.add_argument("--no-dashboard", action="store_true", help="workflows as plain text, not panels")
    parser.add_argument("--retries", type=int, default=5, help="reconnect attempts (default: %(default)s)")
    parser.add_argument("--attach", metavar="ID", help="watch run ID that another client started (needs --key)")
    parser.add_argument("--key", help="the key of the run to --attach to, as --key=KEY (a key may begin with -; "
                                      "its start event has it)")
    return parser


async def _main(args: argparse.Namespace, prompt: str) -> int:
    if args.json:
        renderer: Renderer = JsonRenderer(sys.stdout)
    elif args.workflow and not args.no_dashboard and sys.stdout.isatty():
        try:
            renderer = DashboardRenderer(sys.stdout, args.max_tokens)
        except ImportError:
            renderer = TextRenderer(sys.stdout, color=False)
    else:
        renderer = TextRenderer(sys.stdout, color=sys.stdout.isatty())
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
        client.on_start = _announce
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
