"""Recorded stream shapes of real servers, replayed byte for byte over HTTP and checked event by event; and
the server's own run transcripts (``--transcripts-dir``): where they go, who may read them, what they hold."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from wsagent.core.chunks import Finish, TextDelta, ToolCall, Usage
from wsagent.core.errors import UpstreamError
from wsagent.upstream.simulator import SimulatorServer

from .helpers import ROOT, ServerFactory, recv_json, run_events, upstream_for, ws_connect
from .processes import free_port

HERE = Path(__file__).parent / "transcripts"


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]

EXPECTED: dict[str, list[Any]] = {
    "openai": [
        TextDelta("content", "Checking"),
        ToolCall("call_weather", "get_weather", '{"city":"Paris"}', 0),
        ToolCall("call_time", "get_time", '{"tz":"CET"}', 1),
        Finish("tool_calls"),
        Usage(82, 41, 123),
    ],
    "azure": [
        TextDelta("content", "Bursty content arrives in large"),
        TextDelta("content", " pieces, then is"),
        Finish("content_filter"),
    ],
    "vllm": [
        TextDelta("reasoning", "Two plus two"), TextDelta("reasoning", " is four."),
        TextDelta("content", "4"), TextDelta("content", "."), Finish("stop"), Usage(12, 6, 18),
    ],
    "llamacpp": [
        TextDelta("reasoning", "Let me think."), TextDelta("content", "Hello"), TextDelta("content", " there"),
        Finish("stop"), Usage(9, 4, 13),
    ],
    "ollama": [
        TextDelta("reasoning", "The user wants two lookups."),
        ToolCall("call_a1", "get_weather", '{"city":"Oslo"}', 0),
        ToolCall("call_b2", "get_weather", '{"city":"Rome"}', 0),
        Finish("tool_calls"),
        Usage(150, 40, 190),
    ],
    "litellm": [
        TextDelta("content", "Let me add."),
        ToolCall("toolu_01", "calculator", '{"expression": "2+2"}', 0),
        Finish("tool_calls"),
        Usage(300, 20, 320),
    ],
    # captured from LiteLLM 1.105.7's proxy forwarding to the simulator (tests/test_litellm.py checks it still
    # writes them so): a usage chunk whose choices are not empty, reasoning_tokens details, [DONE] at the end
    "litellm-tools": [
        *[TextDelta("reasoning", w)
          for w in _words("The request needs the calculator and get_time tool, so I will call it.")],
        ToolCall("call_bad99abeed69", "calculator", '{"expression": "2 + 2"}', 0),
        ToolCall("call_d99abeed6929", "get_time", '{"tz": "What is 2 + 2 and what time is it?"}', 1),
        Finish("tool_calls"),
        Usage(14, 15, 29),
    ],
    "deepseek": [
        TextDelta("reasoning", "Hmm, greeting."), TextDelta("content", "Hi!"), Finish("stop"), Usage(6, 9, 15),
    ],
}

ERRORS: dict[str, tuple[list[Any], str, str | int | None]] = {
    "vllm-error": ([TextDelta("content", "Partial")], "KV cache is exhausted", 500),
    "llamacpp-error": ([], "exceeds the available context size", 500),
    "litellm-error": ([TextDelta("content", "Hel")], "Overloaded", "429"),
    # captured from LiteLLM (above): an {"error": ...} event with no [DONE] after it
    "litellm-midstream-error": ([TextDelta("content", "here"), TextDelta("content", " is"), TextDelta("content", " a")],
                                "simulated mid-stream failure", "500"),
    "openrouter": ([TextDelta("content", "Sure")], "Provider disconnected", 502),
}


async def replay(sim: SimulatorServer, name: str, chunk: int) -> tuple[list[Any], UpstreamError | None]:
    raw = (HERE / f"{name}.sse").read_bytes().decode()
    client = upstream_for(sim)
    events: list[Any] = []
    try:
        async for event in client.stream([{"role": "user", "content": name}],
                                         params={"sim": {"raw": raw, "raw_chunk": chunk}}):
            events.append(event)
    except UpstreamError as exc:
        return events, exc
    finally:
        await client.close()
    return events, None


@pytest.mark.parametrize("chunk", [0, 1, 7, 100])
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_transcript(sim: SimulatorServer, name: str, chunk: int, codec: str) -> None:
    events, error = await replay(sim, name, chunk)
    assert error is None
    assert events == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_error_transcript(sim: SimulatorServer, name: str) -> None:
    before, message, upstream_code = ERRORS[name]
    events, error = await replay(sim, name, 13)
    assert events == before
    assert error is not None and message in error.message
    assert error.code == "upstream_stream_error" and error.upstream_code == upstream_code


# -- run transcripts (--transcripts-dir) ------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _one_run(server: Any, path: str = "/ws/chat", run_id: str = "r") -> list[dict[str, Any]]:
    async with ws_connect(server, path) as ws:
        await ws.send(json.dumps({"type": "run", "id": run_id, "prompt": "record me sim:tokens=3"}))
        return await run_events(ws, run_id)


async def test_missing_transcripts_dir_is_created_private(make_server: ServerFactory, tmp_path: Path) -> None:
    """A --transcripts-dir that does not exist failed every run with 1011 (FileNotFoundError in Transcript)."""
    directory = tmp_path / "new" / "transcripts"
    server = await make_server(transcripts_dir=str(directory))
    assert (await _one_run(server))[-1]["type"] == "done"
    assert directory.is_dir() and _mode(directory) == 0o700 and _mode(tmp_path / "new") == 0o700
    assert len(list(directory.glob("*.jsonl"))) == 1


@pytest.mark.parametrize("workers", [1, 2])
async def test_transcripts_dir_that_cannot_be_made_refuses_to_start(tmp_path: Path, workers: int) -> None:
    """A path under a file: ``python -m wsagent.serve`` says so in one line and exits 1, before listening
    (with ``--workers``, once, before any worker starts)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsagent.serve", "--port", str(free_port()), "--workers", str(workers),
        "--transcripts-dir", str(blocker / "transcripts"),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(60):
            async for line in process.stderr:  # ends when it exits; a server that starts says "listening"
                said.append(line.decode())
                if "listening on" in said[-1]:
                    break
            code = await process.wait() if not any("listening on" in line for line in said) else None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 1, "".join(said)
    errors = [line for line in said if "--transcripts-dir" in line]
    assert len(errors) == 1 and str(blocker / "transcripts") in errors[0], "".join(said)
    assert not any("Traceback" in line for line in said), "".join(said)


async def test_transcripts_dir_that_cannot_be_made_is_refused_in_process(make_server: ServerFactory,
                                                                        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--transcripts-dir"):
        await make_server(transcripts_dir=str(blocker / "transcripts"))


async def test_sighup_to_a_transcripts_dir(make_server: ServerFactory, tmp_path: Path) -> None:
    """A reload makes a new --transcripts-dir as a start does; one that cannot be made fails the reload whole."""
    server = await make_server(transcripts_dir=str(tmp_path / "first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = server.settings
    with pytest.raises(SystemExit, match="--transcripts-dir"):
        server.reload(dataclasses.replace(before, transcripts_dir=str(blocker / "x"), max_connections=3))
    assert server.settings == before
    server.reload(dataclasses.replace(before, transcripts_dir=str(tmp_path / "second" / "t")))
    assert _mode(tmp_path / "second" / "t") == 0o700
    assert (await _one_run(server))[-1]["type"] == "done"
    assert len(list((tmp_path / "second" / "t").glob("*.jsonl"))) == 1


async def test_transcript_files_are_private_and_hold_no_run_key(make_server: ServerFactory, tmp_path: Path) -> None:
    """Transcripts were 0644 and their start event carried the run's key (which resumes, attaches, cancels)."""
    old_umask = os.umask(0)  # the file's mode comes from the open, not from whatever umask the service has
    try:
        server = await make_server(transcripts_dir=str(tmp_path))
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send(json.dumps({"type": "run", "id": "k", "prompt": "record me sim:tokens=3"}))
            sent = await run_events(ws, "k")
    finally:
        os.umask(old_umask)
    key = sent[0]["key"]
    assert sent[0]["type"] == "start" and isinstance(key, str) and len(key) >= 16
    (path,) = tmp_path.glob("*.jsonl")
    assert _mode(path) == 0o600
    text = path.read_text()
    assert key not in text
    events = [json.loads(line)["event"] for line in text.splitlines()[1:]]
    assert events[0] == {k: v for k, v in sent[0].items() if k != "key"}
    assert events[1:] == sent[1:]


async def test_transcript_that_cannot_be_opened_does_not_fail_the_run(
        make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The directory vanishes under a running server: runs go on without transcripts, logged once; when
    it is back, so are the transcripts."""
    caplog.set_level(logging.INFO, logger="wsagent")
    directory = tmp_path / "transcripts"
    directory.mkdir()
    server = await make_server(transcripts_dir=str(directory))
    directory.rmdir()
    for run_id in ("r1", "r2"):
        assert (await _one_run(server, "/ws/chat", run_id))[-1]["type"] == "done"
    async with ws_connect(server, "/ws/ai-sdk") as ws:  # another route, another kind of run
        await ws.send(json.dumps({"type": "send", "requestId": "q", "id": "chat-0123456789abcdef",
                                  "trigger": "submit-message", "headers": {}, "body": {}, "messages": [
                                      {"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}))
        frames = [await recv_json(ws)]
        for _ in range(1000):
            if frames[-1]["type"] in ("end", "error"):
                break
            frames.append(await recv_json(ws))
    assert frames[-1]["type"] == "end" and not any(f["type"] == "error" for f in frames), frames
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "transcript" in r.getMessage()]
    assert len(warnings) == 1 and str(directory) in warnings[0].getMessage(), caplog.text
    assert not any(r.exc_info for r in caplog.records), caplog.text
    directory.mkdir(mode=0o700)
    assert (await _one_run(server, "/ws/chat", "back"))[-1]["type"] == "done"
    assert len(list(directory.glob("*-back.jsonl"))) == 1
