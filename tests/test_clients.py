"""The terminal client and websocat, run as a person runs them, against the running server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from websockets.asyncio.server import ServerConnection, serve

from wsagent.client.display import TextDisplay
from wsagent.client.stream import Catchup
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import (
    ROOT,
    ServerFactory,
    expected_text,
    find_run,
    local_broker,
    recv_json,
    run_events,
    start_run,
    ws_connect,
)

WEBSOCAT = shutil.which("websocat") or "websocat"


async def run_command(command: list[str], stdin: bytes | None = None, limit: float = 60,
                      env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(process.communicate(stdin), limit)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def client(server: WsAgentServer, *args: str, path: str = "/ws/chat") -> list[str]:
    return [sys.executable, "-m", "wsagent.client", "--url", f"{server.url}{path}", *args]


async def bounded(command: list[str], limit: float) -> tuple[int | None, float, str, str]:
    """Run ``command`` for at most ``limit`` seconds: its exit code (None: it did not end and was killed),
    how long it ran, and what it wrote."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(*command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None
    reading = asyncio.gather(process.stdout.read(), process.stderr.read())
    code: int | None
    try:
        code = await asyncio.wait_for(process.wait(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        code = None
    elapsed = time.monotonic() - started
    out, err = await reading
    return code, elapsed, out.decode(), err.decode()


async def connections_total(server: WsAgentServer, route: str) -> int:
    """Connections the server accepted on ``route``, from its /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        text = await response.text()
    match = re.search(rf'^wsagent_connections_total{{route="{re.escape(route)}"}} (\d+)', text, re.M)
    return int(match.group(1)) if match else 0


async def test_client_json_events_and_exit_codes(server: WsAgentServer, sim: SimulatorServer) -> None:
    code, out, _ = await run_command(client(server, "--json", "What is a socket?"))
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == \
        await expected_text(sim, "What is a socket?")
    code, out, _ = await run_command(client(server, "--json"), stdin=b"from stdin sim:status=401\n")
    assert code == 1 and json.loads(out.splitlines()[-1])["code"] == "upstream_auth"
    code, _, err = await run_command(client(server), stdin=b"")
    assert code == 2 and "give a prompt" in err


async def test_client_renders_thoughts_with_marks(server: WsAgentServer) -> None:
    code, out, _ = await run_command(client(server, "--agent", "assistant", "What is 6 * 7?"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("💭 ") and any(line.startswith("🔧 calculator(") for line in lines)
    assert "👁 6 * 7 = 42" in lines and lines[-1].startswith("✅ Based on the tool results: 6 * 7 = 42")


async def test_ctrl_c_cancels_then_quits(server: WsAgentServer, sim: SimulatorServer) -> None:
    process = await asyncio.create_subprocess_exec(
        *client(server, "--json", "long story sim:rate=50 sim:tokens=100000"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None
    while json.loads(await process.stdout.readline())["type"] != "token":
        pass
    process.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    last = json.loads(out.decode().splitlines()[-1])
    assert last["type"] == "cancelled" and last["reason"] == "cancelled by client"
    assert process.returncode == 130
    await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1, 10)


async def test_client_reconnects_and_resumes(make_server: ServerFactory, sim: SimulatorServer) -> None:
    server = await make_server(resume_grace=30)
    prompt = "keep going sim:rate=100 sim:tokens=150"
    process = await asyncio.create_subprocess_exec(
        *client(server, "--json", prompt), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    while len(events) < 30:
        events.append(json.loads(await process.stdout.readline()))
    next(c for c in server.manager if c.path == "/ws/chat").ws.transport.abort()
    out, err = await asyncio.wait_for(process.communicate(), 60)
    events += [json.loads(line) for line in out.decode().splitlines()]
    assert process.returncode == 0 and "connection lost (no close frame); reconnecting in" in err.decode()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "".join(e["content"] for e in events if e["type"] == "token") == await expected_text(sim, prompt)


class Terminal:
    """A command in a real terminal (a tmux session): keys in, the screen and exit status out."""

    def __init__(self, command: list[str]) -> None:
        self.session = f"wsagent-{uuid.uuid4().hex[:8]}"
        self.done = Path(f"/tmp/{self.session}.done")
        self.left = Path(f"/tmp/{self.session}.screen")
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "60", "-c", str(ROOT)],
                       check=True)
        # The screen is taken as the command left it, before the shell's next prompt (a moment later: the
        # terminal has drawn the command's last output by then).
        self.keys(f"clear; {shlex.join(command)}; echo exit=$? > {self.done}; sleep 0.3; "
                  f"tmux capture-pane -p -J -t {self.session} > {self.left}; tmux wait-for -S {self.session}",
                  "Enter")

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, *keys], check=True)

    def screen(self) -> str:
        """The screen now, wrapped lines joined."""
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", self.session], capture_output=True,
                              text=True, check=True).stdout

    async def finish(self) -> tuple[str, str]:
        """Wait for the command to end; its exit line and the screen it left (wrapped lines joined)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(subprocess.run, ["tmux", "wait-for", self.session], check=True),
                                   60)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)
        status, screen = self.done.read_text().strip(), self.left.read_text()
        self.done.unlink()
        self.left.unlink()
        return status, screen


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
async def test_dashboard_in_a_terminal(server: WsAgentServer) -> None:
    """The concurrent workflow's live dashboard, in a real terminal (tmux), one panel per agent."""
    terminal = Terminal(client(server, "--workflow", "market-analysis", "--max-tokens", "20", "Analyze TSLA"))
    status, screen = await terminal.finish()
    assert status == "exit=0"
    for agent in ("market-researcher", "financial-analyst", "technical-analyst"):
        assert agent in screen
    counts = [int(n) for n in re.findall(r"(\d+) tokens", screen)]
    assert len(counts) == 3 and min(counts) >= 20 and "━" in screen and screen.count("✅") == 3
    assert "As a market research specialist, here is a simulated answer" in screen


async def test_websocat_one_shot_echo(server: WsAgentServer) -> None:
    code, out, _ = await run_command([WEBSOCAT, "-n", "-1", f"{server.url}/ws"], stdin=b"hello\n")
    assert code == 0 and out == "HELLO\n"


async def test_websocat_chat_helper_streams_text(server: WsAgentServer, sim: SimulatorServer) -> None:
    code, out, _ = await run_command(["scripts/websocat-chat.sh", "What is a websocket?", f"{server.url}/ws/chat"])
    assert code == 0 and out == await expected_text(sim, "What is a websocket?") + "\n[DONE]\n"


async def test_websocat_json_protocol_and_workflow(server: WsAgentServer) -> None:
    code, out, _ = await run_command(["scripts/websocat-run.sh", "Analyze TSLA", "market-analysis",
                                      f"{server.url}/ws/chat"])
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[-1]["type"] == "done" and events[-1]["workflow"] == "market-analysis"


async def test_websocat_agent_thoughts_and_secure(make_server: ServerFactory) -> None:
    secret = "websocat-secret-long-enough-for-hs256"
    server = await make_server(jwt_secret=secret)
    process = await asyncio.create_subprocess_exec(
        WEBSOCAT, "-n", f"{server.url}/ws/agent-thoughts", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"What is 2 + 2?\n")
    await process.stdin.drain()
    kinds: list[str] = []
    while not kinds or kinds[-1] != "done":
        kinds.append(json.loads(await process.stdout.readline())["type"])
    process.kill()
    await process.wait()
    assert {"thinking", "action", "observation", "answer"} <= set(kinds)
    token = jwt.encode({"user_id": "w", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    request = json.dumps({"type": "ping"}).encode() + b"\n"
    code, out, _ = await run_command([WEBSOCAT, "-n", "-1", f"-H=Authorization: Bearer {token}",
                              f"{server.url}/ws/secure"], stdin=request)
    assert code == 0 and json.loads(out) == {"type": "pong"}


async def test_websocat_run_helper_fails_on_error_with_a_unique_id(server: WsAgentServer) -> None:
    """The helper always used the id ``cli`` and exited 0 whatever the run's end."""
    ids = set()
    for prompt in ("first", "second"):
        code, out, _ = await run_command(["scripts/websocat-run.sh", prompt, "", f"{server.url}/ws/chat"])
        ids.add(json.loads(out.splitlines()[0])["id"])
        assert code == 0
    assert len(ids) == 2 and "cli" not in ids
    code, out, _ = await run_command(["scripts/websocat-run.sh", "x sim:status=500", "", f"{server.url}/ws/chat"])
    assert code == 1 and json.loads(out.splitlines()[-1])["type"] == "error"


async def test_client_attaches_to_a_run_started_elsewhere(server: WsAgentServer, sim: SimulatorServer) -> None:
    prompt = "watch me sim:rate=200 sim:tokens=200"
    async with ws_connect(server, "/ws/chat") as owner:
        await owner.send(json.dumps({"type": "run", "id": "shared", "prompt": prompt}))
        start = await recv_json(owner)
        watcher = asyncio.ensure_future(
            run_command(client(server, "--json", "--attach", "shared", f"--key={start['key']}")))
        mine = await run_events(owner, "shared")
        code, out, _ = await watcher
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[-1] == mine[-1]
    assert "".join(e["content"] for e in events if e["type"] == "token") == await expected_text(sim, prompt)
    code, _, err = await run_command(client(server, "--attach", "shared"))
    assert code == 2 and "--attach needs --key" in err
    code, _, err = await run_command(client(server, "--attach", "shared", "--key=-Z9x"))  # keys may begin with "-"
    assert code == 1 and "unknown_run" in err


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
async def test_dashboard_after_ctrl_c_shows_no_agent_running(server: WsAgentServer, sim: SimulatorServer) -> None:
    """Ctrl-C left the dashboard showing every agent still running (🔄)."""
    terminal = Terminal(client(server, "--workflow", "market-analysis", "Analyze sim:rate=20 sim:tokens=2000"))
    await sim.simulator.stats.wait_for(lambda s: s.active == 3, 30)  # all three agents are streaming
    terminal.keys("C-c")
    status, screen = await terminal.finish()
    assert status == "exit=130"
    assert "🔄" not in screen and screen.count("⏹") == 3


SECRET = "client-refusal-secret-long-enough-for-hs256"


def _token(**claims: object) -> str:
    return jwt.encode({"user_id": "carol", "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(("settings", "path", "args", "reason"), [
    ({}, "/ws/secure", [], "4001 Invalid token"),
    ({}, "/ws/secure", ["--token", "not-a-token"], "4001 Invalid token"),
    ({"require_auth": True}, "/ws/chat", [], "4001 Invalid token"),
    ({}, "/ws/secure", ["--token", _token(routes=["/ws/chat"])], "4003 Forbidden route"),
    ({"max_connections_per_user": 1}, "/ws/secure", ["--token", _token()], "4029 Too many connections"),
], ids=["no-token", "bad-token", "require-auth", "forbidden-route", "too-many-connections"])
async def test_client_ends_at_a_refusal(make_server: ServerFactory, settings: dict[str, object], path: str,
                                        args: list[str], reason: str) -> None:
    """A server that refuses the client was flooded with reconnects (19,000 closes with 4001 in 26 s, whatever
    --retries said): every close after a handshake reset the backoff. A refusal now ends the client, at once."""
    server = await make_server(jwt_secret=SECRET, **settings)
    taken = "max_connections_per_user" in settings  # carol's one connection is taken
    async with contextlib.AsyncExitStack() as stack:
        if taken:
            await stack.enter_async_context(ws_connect(server, "/ws/secure",
                                                       additional_headers={"Authorization": f"Bearer {_token()}"}))
        code, elapsed, _, err = await bounded(client(server, "--json", *args, "hello", path=path), 15)
        assert code == 1, f"still running after {elapsed:.0f} s: {err[-500:]}"
        assert f"the server refused the connection: {reason}" in err and "reconnecting" not in err
        assert await connections_total(server, path) == 1 + taken


@pytest.mark.parametrize(("settings", "path", "reason"), [
    ({}, "/nowhere", "HTTP 404"),
    ({"max_connections_per_ip": 1}, "/ws/chat", "HTTP 429"),
], ids=["404", "429"])
async def test_client_ends_at_an_http_refusal(make_server: ServerFactory, settings: dict[str, object], path: str,
                                              reason: str) -> None:
    """An HTTP 4xx at the handshake is a "no" too (429 was retried)."""
    server = await make_server(**settings)
    async with ws_connect(server, "/ws/chat"):  # the address's one connection is taken (429)
        code, elapsed, _, err = await bounded(client(server, "--json", "hello", path=path), 15)
    assert code == 1 and f"the server refused the connection: {reason}" in err and "reconnecting" not in err


async def test_client_retries_drops_under_one_budget() -> None:
    """A server that takes the connection and drops it at once (1011, 1013, 1012, no close frame) is retried
    with backoff, ``--retries`` times in all: a handshake that succeeds does not refill the budget."""
    seen: list[int] = []
    codes = [1011, 1013, 1012, None]

    async def drop(ws: ServerConnection) -> None:
        seen.append(len(seen))
        await ws.recv()  # the client's request
        code = codes[(len(seen) - 1) % len(codes)]
        if code is None:
            ws.transport.abort()
        else:
            await ws.close(code, "try later")

    async with serve(drop, "127.0.0.1", 0) as listener:
        port = listener.sockets[0].getsockname()[1]
        command = [sys.executable, "-m", "wsagent.client", "--url", f"ws://127.0.0.1:{port}/ws/chat",
                   "--json", "--retries", "3", "hello"]
        code, elapsed, _, err = await bounded(command, 20)
    assert code == 1, f"still running after {elapsed:.0f} s with {len(seen)} connections"
    assert len(seen) == 4 and "gave up after 3 retries" in err
    assert err.count("reconnecting in") == 3 and "1011 try later" in err


async def test_client_sends_a_run_again_that_was_never_taken() -> None:
    """Closed (1012: the node is restarting) before the run's start event, so with no key to resume it by:
    the client resumed with ``key: null`` and ended at the server's unknown_run. It asks for the run by id
    (a signed-in user's run is found so) and sends the run again when the server does not know it."""
    seen: list[dict[str, Any]] = []

    async def node(ws: ServerConnection) -> None:
        request = json.loads(await ws.recv())
        seen.append(request)
        if len(seen) == 1:  # the request went out as this node stopped: it never took it
            await ws.close(1012, "service restart: reconnect and resume")
            return
        if request["type"] == "resume":
            await ws.send(json.dumps({"type": "error", "id": request["id"], "code": "unknown_run",
                                      "message": "no run of yours"}))
            request = json.loads(await ws.recv())
            seen.append(request)
        events = [{"type": "start", "key": "k1"}, {"type": "token", "content": "hello"}, {"type": "done"}]
        for seq, event in enumerate(events, 1):
            await ws.send(json.dumps({**event, "id": request["id"], "seq": seq}))
        await ws.wait_closed()

    async with serve(node, "127.0.0.1", 0) as listener:
        port = listener.sockets[0].getsockname()[1]
        command = [sys.executable, "-m", "wsagent.client", "--url", f"ws://127.0.0.1:{port}/ws/chat", "hi"]
        code, _, out, err = await bounded(command, 20)
    assert code == 0 and out == "hello\n", err
    assert [r["type"] for r in seen] == ["run", "resume", "run"] and "key" not in seen[1]
    assert seen[0] == seen[2] and "the server is restarting (1012 service restart" in err


async def test_client_budget_refills_when_the_run_moves(make_server: ServerFactory, sim: SimulatorServer) -> None:
    """A long run on a flaky network: each reconnect that brings new events of the run refills the budget, so
    three drops, each after progress, do not end a run with ``--retries 1``."""
    server = await make_server(resume_grace=30)
    prompt = "keep going sim:rate=100 sim:tokens=200"
    process = await asyncio.create_subprocess_exec(
        *client(server, "--json", "--retries", "1", prompt), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT)
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    for drop in (20, 60, 100):
        while len(events) < drop:
            events.append(json.loads(await process.stdout.readline()))
        next(c for c in server.manager if c.path == "/ws/chat").ws.transport.abort()
    out, err = await asyncio.wait_for(process.communicate(), 60)
    events += [json.loads(line) for line in out.decode().splitlines()]
    assert process.returncode == 0 and err.decode().count("reconnecting in") == 3
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "".join(e["content"] for e in events if e["type"] == "token") == await expected_text(sim, prompt)


async def test_unknown_run_with_a_key_is_not_told_to_send_it(server: WsAgentServer) -> None:
    """``unknown_run ... (send its key)`` was printed to a client that had sent the key."""
    code, _, err = await run_command(client(server, "--attach", "gone", "--key=-Z9x"))
    assert code == 1 and "unknown_run" in err and "send its key" not in err
    assert "no run 'gone' with that key" in err


# What each kind of run is started with; every prompt is slow enough for a watcher to attach mid-stream.
KINDS = {
    "model": [],
    "agent": ["--agent", "assistant"],
    "concurrent-workflow": ["--workflow", "market-analysis"],
    "sequential-workflow": ["--workflow", "research-then-write"],
}
SLOW = "Analyze TSLA sim:rate=15 sim:tokens=60"


async def polled(check: Callable[[], object], limit: float = 30) -> None:
    """Wait until ``check()`` is true (for what tells no one: a tmux screen, a run's watchers)."""
    async with asyncio.timeout(limit):
        while True:
            if check():
                return
            await asyncio.sleep(0.05)


async def watched_mid_stream(server: WsAgentServer, run_id: str, watchers: int) -> None:
    """Wait until ``watchers`` clients watch run ``run_id``, and check it is still streaming then."""
    await polled(lambda: (r := find_run(server, run_id)) is not None and r.watchers >= watchers)
    run_ = find_run(server, run_id)
    assert run_ is not None and not run_.finished, "the watcher attached too late to test anything"


def hint_of(screen: str) -> tuple[list[str], str]:
    """The attach command the owner's terminal suggests, and the screen without it."""
    lines = screen.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("watch from another terminal: "))
    last = next(i for i in range(first, len(lines)) if "--key=" in lines[i])
    hint = " ".join(lines[first:last + 1]).removeprefix("watch from another terminal: ")
    return shlex.split(hint), "\n".join(lines[:first] + lines[last + 1:])


def same_screen(screen: str) -> str:
    return "\n".join(line.rstrip() for line in screen.splitlines()).strip("\n")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
@pytest.mark.parametrize("kind", list(KINDS))
async def test_attached_terminal_shows_what_the_owner_saw(server: WsAgentServer, kind: str) -> None:
    """The hint the owner's terminal prints, run as is in a second terminal, shows the same screen: a workflow's
    dashboard once (not its snapshot and then its replay, each agent's text doubled), without ``--workflow``."""
    owner = Terminal(client(server, *KINDS[kind], SLOW))
    await polled(lambda: "--key=" in owner.screen())
    command, _ = hint_of(owner.screen())
    assert command[:5] == ["python", "-m", "wsagent.client", "--url", f"{server.url}/ws/chat"]
    watcher = Terminal([sys.executable, *command[1:]])
    await watched_mid_stream(server, command[command.index("--attach") + 1], 2)
    (owner_status, owner_screen), (status, screen) = await asyncio.gather(owner.finish(), watcher.finish())
    assert owner_status == status == "exit=0"
    assert same_screen(screen) == same_screen(hint_of(owner_screen)[1])
    if "workflow" in kind:  # a panel per agent, each agent done
        agents = {"concurrent-workflow": 3, "sequential-workflow": 2}[kind]
        assert screen.count("╭") == screen.count("✅") == agents


def rendered(events: list[dict[str, object]]) -> str:
    """What the terminal client prints for ``events`` when it prints text (no terminal: no colours)."""
    out = io.StringIO()
    renderer = TextDisplay(out, color=False)
    for event in events:
        renderer.event(event)
    renderer.close()
    return out.getvalue()


@pytest.mark.parametrize("workflow", ["market-analysis", "research-then-write"])
async def test_attached_client_prints_what_the_owner_got(server: WsAgentServer, workflow: str) -> None:
    """Without a terminal, the watcher prints the owner's events, each once (``--json``), and as text each
    agent's words under its own label (they interleaved under one: ``TheTheThe user user user``)."""
    owner = await asyncio.create_subprocess_exec(*client(server, "--json", "--workflow", workflow, SLOW),
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert owner.stdout is not None
    start = json.loads(await owner.stdout.readline())
    attach = ["--attach", start["id"], f"--key={start['key']}"]
    watchers = asyncio.gather(run_command(client(server, "--json", *attach)), run_command(client(server, *attach)))
    await watched_mid_stream(server, start["id"], 3)
    out, _ = await owner.communicate()
    events = [start, *(json.loads(line) for line in out.decode().splitlines())]
    (code, json_out, _), (text_code, text_out, _) = await watchers
    assert code == text_code == owner.returncode == 0
    assert [json.loads(line) for line in json_out.splitlines()] == events
    assert text_out == rendered(events)
    agents = {e["agent"] for e in events if e.get("agent")}
    assert len(agents) > 1
    for agent in agents:
        for kind, mark in (("answer", "✅"), ("thinking", "💭")):
            label = f"{mark} [{agent}] "
            said = "".join(line.removeprefix(label) for line in text_out.splitlines() if line.startswith(label))
            assert said == "".join(e["content"] for e in events if e["type"] == kind and e["agent"] == agent)


async def test_attaching_after_the_log_was_trimmed(make_server: ServerFactory) -> None:
    """The run's first events are gone (``--replay-bytes``): the watcher shows the snapshot and what follows it
    when the server says where the snapshot ends, else what is kept, with a note; never both."""
    server = await make_server(replay_bytes=1500)
    owner = await asyncio.create_subprocess_exec(
        *client(server, "--json", "--workflow", "market-analysis", "Analyze TSLA sim:rate=20 sim:tokens=150"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert owner.stdout is not None
    start = json.loads(await owner.stdout.readline())
    owned = asyncio.ensure_future(owner.communicate())  # read on: a full pipe would stall the owner, and the run
    await polled(lambda: (r := find_run(server, start["id"])) is not None and r.oldest_kept > 1)
    watcher = asyncio.ensure_future(
        run_command(client(server, "--json", "--attach", start["id"], f"--key={start['key']}")))
    await watched_mid_stream(server, start["id"], 2)
    out, _ = await owned
    events = [start, *(json.loads(line) for line in out.decode().splitlines())]
    code, watched_out, err = await watcher
    seen = [json.loads(line) for line in watched_out.splitlines()]
    assert code == 0 and seen[-1] == events[-1], err
    if seen[0]["type"] == "snapshot" and "after" in seen[0]:
        after = seen[0]["after"]
        assert seen[1:] == [e for e in events if e["seq"] > after]
        for agent in seen[0]["agents"]:
            assert agent["content"] == "".join(e["content"] for e in events if e["type"] == "answer"
                                               and e["agent"] == agent["agent"] and e["seq"] <= after)
    else:
        assert all(e["type"] != "snapshot" for e in seen) and seen[0]["seq"] > 1
        assert seen == [e for e in events if e["seq"] >= seen[0]["seq"]]
        assert f"the first {seen[0]['seq'] - 1} events of this run are no longer kept" in err


def test_catchup_shows_the_snapshot_or_the_replay_never_both() -> None:
    """Each case of what a server may answer an attach with (the first events kept or not; a snapshot that
    says which events it covers, or not), including a server that says it (``after``), which this one
    does not yet."""
    def ev(seq: int) -> dict[str, object]:
        return {"type": "answer", "id": "r", "seq": seq, "agent": "a", "workflow": "w", "content": f"{seq} "}

    snapshot: dict[str, object] = {"type": "snapshot", "id": "r", "workflow": "w",
                                   "agents": [{"agent": "a", "status": "running", "content": "1 2 3 4 5 "}]}
    notes: list[str] = []
    whole = Catchup(notes.append)  # every event is kept: the replay alone
    assert whole.feed(snapshot) == [] and whole.feed(ev(1)) == [ev(1)] and whole.feed(ev(2)) == [ev(2)]
    covered = Catchup(notes.append)  # events 1-2 are gone; the snapshot covers up to 5
    assert covered.feed({**snapshot, "after": 5}) == []
    assert covered.feed(ev(3)) == [{**snapshot, "after": 5}]
    assert [covered.feed(ev(seq)) for seq in (4, 5, 6)] == [[], [], [ev(6)]]
    assert notes == []
    unsaid = Catchup(notes.append)  # events 1-2 are gone, and the snapshot does not say what it covers
    assert unsaid.feed(snapshot) == [] and unsaid.feed(ev(3)) == [ev(3)]
    assert notes == ["the first 2 events of this run are no longer kept: it is shown from event 3"]
    again = Catchup(notes.append, shown=7)  # watching again after event 7, which is still kept
    assert again.feed(snapshot) == [] and again.feed(ev(5)) == [ev(5)] and len(notes) == 1
    gap = Catchup(notes.append, shown=7)  # ... or is not
    assert gap.feed({**snapshot, "after": 12}) == [] and gap.feed(ev(10)) == [ev(10)]
    assert notes[-1] == "2 events of this run (after event 7) are no longer kept"


def test_text_renderer_keeps_each_agent_on_its_own_lines() -> None:
    """Concurrent agents' tokens used to share one line under one label (``TheTheThe user user user``)."""
    def ev(kind: str, agent: str, content: str = "") -> dict[str, object]:
        return {"type": kind, "id": "r", "agent": agent, "workflow": "w", "content": content, "outcome": "done"}

    events: list[dict[str, object]] = [ev("thinking", "a", "The"), ev("thinking", "b", "The"),
                                       ev("thinking", "a", " user"), ev("answer", "b", " late"),
                                       ev("answer", "a", "Line one\nline"), ev("answer", "b", " more"),
                                       ev("answer", "a", " two\n"), ev("answer", "b", "!"), ev("agent_end", "a"),
                                       ev("agent_end", "b"),
                                       {"type": "done", "id": "r", "workflow": "w", "finish_reason": "stop"}]
    assert rendered(events) == ("💭 [a] The user\n✅ [a] Line one\n✅ [a] line two\n"
                                "💭 [b] The\n✅ [b]  late more!\n■ b: done\n■ a: done\n")


# A person in the loop: the assistant's calculator call waits for an approval.
CALC = "What is (2 + 3) * 7?"
CALL = 'calculator({"expression": "(2 + 3) * 7"})'
QUESTION = f"approve {CALL}? [y/N] "


def agent_client(server: WsAgentServer, *args: str) -> list[str]:
    return client(server, "--agent", "assistant", *args, CALC)


async def test_client_approve_flag_answers_yes(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    code, out, err = await run_command(agent_client(server, "--json", "--approve"))
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    request = next(e for e in events if e["type"] == "approval_request")
    assert request["name"] == "calculator" and json.loads(request["arguments"]) == {"expression": "(2 + 3) * 7"}
    assert [(e["call_id"], e["approved"]) for e in events if e["type"] == "approval"] == [(request["call_id"], True)]
    assert [e["content"] for e in events if e["type"] == "observation"] == ["(2 + 3) * 7 = 35"]
    assert events[-1]["type"] == "done" and "approval" not in err


async def test_client_deny_flag_answers_no(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    code, out, err = await run_command(agent_client(server, "--json", "--deny"))
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    kinds = [e["type"] for e in events]
    assert "observation" not in kinds and "action" not in kinds and kinds[-1] == "done"
    assert [(e["approved"], e["reason"]) for e in events if e["type"] == "approval"] == [
        (False, "denied by the client's --deny")]
    assert "denied the call to calculator" in "".join(e["content"] for e in events if e["type"] == "answer")


async def test_client_without_a_terminal_denies_and_says_so(make_server: ServerFactory) -> None:
    """No terminal to ask on and no flag: the request is denied at once (the client never waits for an answer
    no one can give), stderr says why, and the text shows the request and its answer."""
    server = await make_server(approval_tools=("calculator",))
    code, elapsed, out, err = await bounded(agent_client(server), 30)
    assert code == 0, f"after {elapsed:.0f} s: {err}"
    assert f"{CALL} needs a person's approval and there is no terminal to ask on: denied" in err
    lines = out.splitlines()
    assert lines[1:3] == [f"⏸ {CALL} waits for approval", "✖ calculator denied: no one at a terminal to ask"]
    assert not any(line.startswith("👁") for line in lines)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
@pytest.mark.parametrize(("typed", "approved"), [("y", True), ("", False)], ids=["y", "enter"])
async def test_client_asks_a_person_at_the_terminal(make_server: ServerFactory, typed: str, approved: bool) -> None:
    """In a terminal the client shows the call and asks; y approves (the tool runs), just Enter denies."""
    server = await make_server(approval_tools=("calculator",))
    terminal = Terminal(agent_client(server))
    await polled(lambda: QUESTION.rstrip() in terminal.screen())
    (run,) = list(local_broker(server))
    assert run.waiting_for  # the run waits for the person
    terminal.keys(*([typed] if typed else []), "Enter")
    status, screen = await terminal.finish()
    assert status == "exit=0"
    lines = [line.rstrip() for line in hint_of(screen)[1].splitlines() if line.strip()]
    asked = lines.index(f"⏸ {CALL} waits for approval")
    if approved:
        assert lines[asked + 1:asked + 5] == [QUESTION + "y", "✔ calculator approved", f"🔧 {CALL}",
                                              "👁 (2 + 3) * 7 = 35"]
    else:
        assert lines[asked + 1:asked + 3] == [QUESTION.rstrip(), "✖ calculator denied"]
        assert not any(line.startswith("👁") for line in lines)
    assert lines[-1].startswith("✅ Based on the tool results:")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
async def test_terminal_question_is_withdrawn_when_answered_elsewhere(make_server: ServerFactory) -> None:
    """The owner is being asked when a watcher with the key (``--attach ... --approve``) answers first: the
    question is withdrawn, and both show the one answer."""
    server = await make_server(approval_tools=("calculator",))
    owner = Terminal(agent_client(server))
    await polled(lambda: QUESTION.rstrip() in owner.screen())
    command, _ = hint_of(owner.screen())
    attach = command[command.index("--attach"):]
    code, out, err = await run_command(client(server, "--json", "--approve", *attach))
    status, screen = await owner.finish()
    assert code == 0 and status == "exit=0", err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["approved"] for e in events if e["type"] == "approval"] == [True]
    lines = [line.rstrip() for line in screen.splitlines()]
    assert f"{QUESTION}(answered elsewhere)" in lines and "✔ calculator approved" in lines
    assert "👁 (2 + 3) * 7 = 35" in lines


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
async def test_terminal_answer_reaches_a_run_resumed_after_a_drop(make_server: ServerFactory) -> None:
    """The connection drops while the person is asked: the client resumes the run, the question stays, and the
    answer goes out on the new connection."""
    server = await make_server(approval_tools=("calculator",), resume_grace=30)
    terminal = Terminal(agent_client(server))
    await polled(lambda: QUESTION.rstrip() in terminal.screen())
    next(c for c in server.manager if c.path == "/ws/chat").ws.transport.abort()  # no close frame
    await polled(lambda: server.manager.total_by_route["/ws/chat"] == 2)  # the client is back
    terminal.keys("y", "Enter")
    status, screen = await terminal.finish()
    assert status == "exit=0"
    assert "connection lost (no close frame); reconnecting in" in screen
    assert "✔ calculator approved" in screen and "👁 (2 + 3) * 7 = 35" in screen


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (installed by .ci/run)")
async def test_dashboard_makes_room_for_the_question(make_server: ServerFactory) -> None:
    """A workflow's agent asks (the financial analyst's calculator): the live dashboard stops redrawing while the
    person is asked, so the question and the answer typed stay readable, then goes on below them."""
    server = await make_server(approval_tools=("calculator",))
    terminal = Terminal(client(server, "--workflow", "market-analysis", CALC))
    await polled(lambda: QUESTION.rstrip() in terminal.screen())
    terminal.keys("y", "Enter")
    status, screen = await terminal.finish()
    assert status == "exit=0"
    lines = [line.rstrip() for line in screen.splitlines()]
    asked = lines.index(QUESTION + "y")
    after = "\n".join(lines[asked + 1:])
    assert lines[asked - 1].startswith("╰") and after.count("╭") == after.count("✅") == 3  # a whole frame below
    assert "🔄" not in after and "(2 + 3) * 7 = 35" in after


async def test_watchers_print_approvals_and_steers_and_leave_answers_to_the_owner(
        make_server: ServerFactory) -> None:
    """Watchers without a terminal (``--attach``, as ``--json`` and as text) answer nothing: the owner does.
    They print the approval and the steering message as they come."""
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as owner:
        key = await start_run(owner, "p", CALC, agent="assistant")
        request = await recv_json(owner)
        while request["type"] != "approval_request":
            request = await recv_json(owner)
        attach = ["--attach", "p", f"--key={key}"]
        watchers = asyncio.gather(run_command(client(server, "--json", *attach)), run_command(client(server, *attach)))
        await watched_mid_stream(server, "p", 3)
        await owner.send(json.dumps({"type": "steer", "id": "p", "content": "say it in French"}))
        await owner.send(json.dumps({"type": "approve", "id": "p", "call_id": request["call_id"], "approved": True}))
        events = [request, *await run_events(owner, "p")]
    (code, json_out, json_err), (text_code, text_out, text_err) = await watchers
    assert code == text_code == 0, json_err + text_err
    watched = [json.loads(line) for line in json_out.splitlines()]
    person = [e for e in events if e["type"] in ("approval_request", "approval", "steer")]
    assert [e for e in watched if e["type"] in ("approval_request", "approval", "steer")] == person
    assert [e["type"] for e in person] == ["approval_request", "approval", "steer"]
    assert "terminal" not in json_err + text_err  # nobody denied for want of one
    lines = text_out.splitlines()
    assert f"⏸ {CALL} waits for approval" in lines and "✔ calculator approved" in lines
    assert "✉ steer “say it in French”: delivered" in lines


def test_text_renderer_shows_what_a_person_is_asked_and_says() -> None:
    def ev(kind: str, **fields: object) -> dict[str, object]:
        return {"type": kind, "id": "r", "agent": "assistant", **fields}

    events = [ev("answer", content="Let me check"),
              ev("approval_request", call_id="c1", name="calculator", arguments='{"expression": "1 + 1"}'),
              ev("approval", call_id="c1", approved=True), ev("approval", call_id="c2", approved=False, reason="no"),
              ev("steer", content="shorter", delivered=True),
              ev("steer", content="later", delivered=False, reason="finished")]
    assert rendered(events) == ('✅ Let me check\n⏸ calculator({"expression": "1 + 1"}) waits for approval\n'
                                "✔ calculator approved\n✖ call c2 denied: no\n✉ steer “shorter”: delivered\n"
                                "✉ steer “later”: not delivered (finished)\n")


async def test_websocat_approves_as_the_documentation_shows(make_server: ServerFactory) -> None:
    """docs/person-in-the-loop.md's websocat exchange: a run, its approval_request, an approve typed back."""
    server = await make_server(approval_tools=("calculator",))
    process = await asyncio.create_subprocess_exec(
        WEBSOCAT, f"{server.url}/ws/chat", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b'{"type":"run","id":"r1","agent":"assistant","prompt":"What is (2 + 3) * 7?"}\n')
    await process.stdin.drain()
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while not events or events[-1]["type"] != "approval_request":
            events.append(json.loads(await process.stdout.readline()))
        call_id = events[-1]["call_id"]
        process.stdin.write(json.dumps({"type": "approve", "id": "r1", "call_id": call_id,
                                        "approved": True}).encode() + b"\n")
        await process.stdin.drain()
        while events[-1]["type"] != "done":
            events.append(json.loads(await process.stdout.readline()))
    process.kill()
    await process.wait()
    kinds = [e["type"] for e in events]
    assert kinds.index("approval_request") < kinds.index("approval") < kinds.index("observation")
    assert next(e for e in events if e["type"] == "observation")["content"] == "(2 + 3) * 7 = 35"
