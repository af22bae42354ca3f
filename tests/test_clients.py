"""The terminal client and websocat, run as a person runs them, against the running server."""

from __future__ import annotations

import asyncio
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
from pathlib import Path

import jwt
import pytest

from wsagent.server import WsAgentServer
from wsagent.simulator import SimulatorServer

from .conftest import ServerFactory, recv_json, run_events, ws_connect
from .test_chat import expected_text

ROOT = Path(__file__).parent.parent
WEBSOCAT = shutil.which("websocat") or "websocat"


async def run(command: list[str], stdin: bytes | None = None, limit: float = 60,
              env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(process.communicate(stdin), limit)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def client(server: WsAgentServer, *args: str) -> list[str]:
    return [sys.executable, "-m", "wsagent.client", "--url", f"{server.url}/ws/chat", *args]


async def test_client_json_events_and_exit_codes(server: WsAgentServer, sim: SimulatorServer) -> None:
    code, out, _ = await run(client(server, "--json", "What is a socket?"))
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == \
        await expected_text(sim, "What is a socket?")
    code, out, _ = await run(client(server, "--json"), stdin=b"from stdin sim:status=401\n")
    assert code == 1 and json.loads(out.splitlines()[-1])["code"] == "upstream_auth"
    code, _, err = await run(client(server), stdin=b"")
    assert code == 2 and "give a prompt" in err


async def test_client_renders_thoughts_with_marks(server: WsAgentServer) -> None:
    code, out, _ = await run(client(server, "--agent", "assistant", "What is 6 * 7?"))
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
    events = []
    while len(events) < 30:
        events.append(json.loads(await process.stdout.readline()))
    next(c for c in server.manager if c.path == "/ws/chat").ws.transport.abort()
    out, err = await asyncio.wait_for(process.communicate(), 60)
    events += [json.loads(line) for line in out.decode().splitlines()]
    assert process.returncode == 0 and "resuming" in err.decode()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert "".join(e["content"] for e in events if e["type"] == "token") == await expected_text(sim, prompt)


class Terminal:
    """A command in a real terminal (a tmux session): keys in, the screen and exit status out."""

    def __init__(self, command: list[str]) -> None:
        self.session = f"wsagent-{uuid.uuid4().hex[:8]}"
        self.done = Path(f"/tmp/{self.session}.done")
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "60", "-c", str(ROOT)],
                       check=True)
        self.keys(f"clear; {shlex.join(command)}; echo exit=$? > {self.done}; tmux wait-for -S {self.session}",
                  "Enter")

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, *keys], check=True)

    async def finish(self) -> tuple[str, str]:
        """Wait for the command to end; its exit line and the screen it left."""
        try:
            await asyncio.wait_for(asyncio.to_thread(subprocess.run, ["tmux", "wait-for", self.session], check=True),
                                   60)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True,
                                    text=True, check=True).stdout
        finally:
            subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)
        status = self.done.read_text().strip()
        self.done.unlink()
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
    code, out, _ = await run([WEBSOCAT, "-n", "-1", f"{server.url}/ws"], stdin=b"hello\n")
    assert code == 0 and out == "HELLO\n"


async def test_websocat_chat_helper_streams_text(server: WsAgentServer, sim: SimulatorServer) -> None:
    code, out, _ = await run(["scripts/websocat-chat.sh", "What is a websocket?", f"{server.url}/ws/chat"])
    assert code == 0 and out == await expected_text(sim, "What is a websocket?") + "\n[DONE]\n"


async def test_websocat_json_protocol_and_workflow(server: WsAgentServer) -> None:
    code, out, _ = await run(["scripts/websocat-run.sh", "Analyze TSLA", "market-analysis", f"{server.url}/ws/chat"])
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
    code, out, _ = await run([WEBSOCAT, "-n", "-1", f"-H=Authorization: Bearer {token}",
                              f"{server.url}/ws/secure"], stdin=request)
    assert code == 0 and json.loads(out) == {"type": "pong"}




async def test_websocat_run_helper_fails_on_error_with_a_unique_id(server: WsAgentServer) -> None:
    """The helper always used the id ``cli`` and exited 0 whatever the run's end."""
    ids = set()
    for prompt in ("first", "second"):
        code, out, _ = await run(["scripts/websocat-run.sh", prompt, "", f"{server.url}/ws/chat"])
        ids.add(json.loads(out.splitlines()[0])["id"])
        assert code == 0
    assert len(ids) == 2 and "cli" not in ids
    code, out, _ = await run(["scripts/websocat-run.sh", "x sim:status=500", "", f"{server.url}/ws/chat"])
    assert code == 1 and json.loads(out.splitlines()[-1])["type"] == "error"


async def test_client_attaches_to_a_run_started_elsewhere(server: WsAgentServer, sim: SimulatorServer) -> None:
    prompt = "watch me sim:rate=200 sim:tokens=200"
    async with ws_connect(server, "/ws/chat") as owner:
        await owner.send(json.dumps({"type": "run", "id": "shared", "prompt": prompt}))
        start = await recv_json(owner)
        watcher = asyncio.ensure_future(run(client(server, "--json", "--attach", "shared", f"--key={start['key']}")))
        mine = await run_events(owner, "shared")
        code, out, _ = await watcher
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[-1] == mine[-1]
    assert "".join(e["content"] for e in events if e["type"] == "token") == await expected_text(sim, prompt)
    code, _, err = await run(client(server, "--attach", "shared"))
    assert code == 2 and "--attach needs --key" in err
    code, _, err = await run(client(server, "--attach", "shared", "--key=-Z9x"))  # keys may begin with "-"
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
