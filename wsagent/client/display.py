"""How the terminal client shows a run: each event of the JSON protocol, a note of its own, room for a question
to a person (:mod:`.person`), and the end.

:class:`TextDisplay` writes tokens inline and thoughts with a mark each, :class:`DashboardDisplay` a live
panel per agent of a workflow (rich), :class:`JsonDisplay` raw events for scripts, and :class:`WatchDisplay`
picks one by the first event of a run it watches.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, Protocol, TextIO

__all__ = ["Display", "DashboardDisplay", "JsonDisplay", "TERMINAL", "TextDisplay", "WatchDisplay"]

#: The events that end a run.
TERMINAL = {"done", "error", "cancelled"}
#: The mark before each kind of thought.
MARKS = {"thinking": "💭", "action": "🔧", "observation": "👁", "answer": "✅", "refusal": "⛔"}
#: The events that carry text (written inline, as it streams).
TEXT_KINDS = ("token", "answer", "thinking", "refusal")


class Display(Protocol):
    """How the client shows a run: every event, a note of its own, and the end."""

    def event(self, event: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def pause(self) -> None:
        """A question for a person is about to be written on the terminal: make room for it."""

    def resume(self) -> None:
        """The question was answered (or withdrawn): show the run again as before."""

    def close(self) -> None: ...


class JsonDisplay:
    """One raw event per line, for scripts."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def event(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        sys.stderr.write(text + "\n")

    def pause(self) -> None:
        return None

    def resume(self) -> None:
        return None

    def close(self) -> None:
        return None


class TextDisplay:
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
        self.tools: dict[str, str] = {}  # the tool of each call an approval was asked for, by call id
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
                author = {"agent": agent.get("agent"), "workflow": event.get("workflow")}
                if agent.get("content"):
                    self.event({"type": "answer", "content": agent["content"], **author})
                if agent.get("status") not in (None, "running"):
                    self.event({"type": "agent_end", "outcome": agent["status"], **author})
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
        elif kind in ("approval_request", "approval", "steer"):
            self._newline()
            self._write(f"{label}{self._person(event)}\n", "yellow")
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

    def _person(self, event: dict[str, Any]) -> str:
        """A line for what a person is asked or said: an approval request, its answer, a steering message."""
        kind, call_id = event.get("type"), str(event.get("call_id"))
        if kind == "approval_request":
            self.tools[call_id] = str(event.get("name"))
            return f"⏸ {event.get('name')}({event.get('arguments')}) waits for approval"
        if kind == "approval":
            tool = self.tools.get(call_id, f"call {call_id}")
            if event.get("approved"):
                return f"✔ {tool} approved"
            return f"✖ {tool} denied" + (f": {event['reason']}" if event.get("reason") else "")
        said = f"✉ steer “{event.get('content')}”"
        if event.get("delivered"):
            return f"{said}: delivered"
        return f"{said}: not delivered" + (f" ({event['reason']})" if event.get("reason") else "")

    def _newline(self) -> None:
        if self.line is not None:
            self._write("\n")
            self.line = None

    def pause(self) -> None:
        self._newline()  # the question starts a line of its own; the person's Enter ends it

    def resume(self) -> None:
        return None

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


class DashboardDisplay:
    """A live panel per agent of a concurrent workflow: status, tokens, a progress bar when the length is known.

    While streaming, the count is of frames received (the relay may merge tokens for a slow terminal);
    the model's own count replaces it when its usage arrives.
    """

    def __init__(self, out: TextIO, max_tokens: int | None) -> None:
        from rich.console import Console

        self.console = Console(file=out)
        self.max_tokens = max_tokens
        self.agents: dict[str, dict[str, Any]] = {}
        self.live = self._live()

    def _live(self) -> Any:
        """The live panels, drawn from where the cursor is."""
        from rich.live import Live

        live = Live(self._render(), console=self.console, refresh_per_second=10, transient=False)
        live.start()
        return live

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
            elif kind == "approval_request":
                state["thinking"] = f"⏸ waits for approval: {event.get('name')}({event.get('arguments')})"
            elif kind == "approval":
                reason = f": {event['reason']}" if event.get("reason") else ""
                state["thinking"] = "✔ approved" if event.get("approved") else f"✖ denied{reason}"
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

    def pause(self) -> None:
        self.live.stop()  # the last frame stays; the question goes below it, with no redraw over the answer

    def resume(self) -> None:
        self.live = self._live()  # below the question and its answer (the one stopped would draw over them)

    def close(self) -> None:
        """The last frame, then the terminal back: no agent is left shown as running (a second Ctrl-C
        quits without waiting for the run's end)."""
        self._settle("cancelled")
        self.live.update(self._render(), refresh=True)
        self.live.stop()


class WatchDisplay:
    """A watcher's display, chosen by the run it watches (``--attach`` is not told what the run is): the
    live dashboard for a workflow, as its owner has it, text for anything else."""

    def __init__(self, choose: Callable[[dict[str, Any]], Display]) -> None:
        self.choose = choose
        self.chosen: Display | None = None

    def event(self, event: dict[str, Any]) -> None:
        if self.chosen is None:
            self.chosen = self.choose(event)
        self.chosen.event(event)

    def note(self, text: str) -> None:
        if self.chosen is not None:
            self.chosen.note(text)
        else:
            sys.stderr.write(text + "\n")

    def pause(self) -> None:
        if self.chosen is not None:
            self.chosen.pause()

    def resume(self) -> None:
        if self.chosen is not None:
            self.chosen.resume()

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()
