"""Settings come from one table of declarations; the server takes who it is from its caller, not the environment,
and changes nothing process-wide by being embedded."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import socket
import subprocess
import sys
from asyncio import selector_events
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wsagent.core.config import RELOADABLE, Settings, Spec, build_parser, load_settings
from wsagent.transport.connections import connection_id
from wsagent.upstream.model import UpstreamConfig
from wsagent.upstream.simulator import SimulatorServer, SimulatorSettings
from wsagent.wiring.server import WsAgentServer
from wsagent.wiring.workers import Worker, socket_path

from .helpers import ServerFactory, recv_json, upstream_for, ws_connect

#: What SIGHUP applies. Pinned here so that a new setting's ``reload=`` is a decision, not an accident.
RELOADED = {
    "max_connections", "idle_ping", "drain_timeout", "client_id_policy", "outbox_bytes", "max_broadcast_bytes",
    "allowed_models", "slow_client_timeout", "max_runs_per_connection", "run_buffer_bytes", "replay_bytes",
    "resume_grace", "ai_sdk_grace", "replay_budget_bytes", "replay_budget_per_user", "history_messages",
    "history_chars", "workflows", "agents", "jwt_secret", "jwt_secret_file", "jwt_public_key_file",
    "jwt_algorithms", "jwt_audience", "jwt_issuer", "jwt_user_claim", "jwt_leeway", "require_auth",
    "allowed_origins", "max_connections_per_ip", "max_connections_per_user", "messages_per_second",
    "message_burst", "max_runs_per_user", "max_runs_per_ip", "run_max_seconds", "run_max_tokens", "transcripts_dir",
    "log_level", "approval_tools", "approval_timeout", "on_busy",
}

CHOICES = {"event_loop": "'auto', 'uvloop' or 'asyncio'", "compression": "'deflate' or 'off'",
           "client_id_policy": "'replace' or 'reject'", "upstream_api": "'chat' or 'responses'",
           "log_format": "'text' or 'json'", "log_level": "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'",
           "on_busy": "'enqueue', 'reject', 'interrupt' or 'steer'",
           "takeover": "'off', 'background' or 'continue'"}
#: What a choice needs beside it to be taken (each says so when it is missing: see the takeover test below).
NEEDS = {("takeover", "background"): ["--redis-url", "redis://127.0.0.1:6379/0", "--upstream-api", "responses",
                                      "--upstream-url", "http://127.0.0.1:8000/v1"],
         ("takeover", "continue"): ["--redis-url", "redis://127.0.0.1:6379/0"]}


def spec(name: str) -> Spec:
    (found,) = [f.metadata["spec"] for f in dataclasses.fields(Settings) if f.name == name]
    assert isinstance(found, Spec)
    return found


def test_the_reload_list_is_the_declared_one() -> None:
    assert RELOADABLE == RELOADED


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_choice_is_checked_from_its_declaration(name: str) -> None:
    flag, variable = "--" + name.replace("_", "-"), (spec(name).env or f"WSAGENT_{name.upper()}")
    message = f"{flag} must be {CHOICES[name]}"
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_settings([flag, "neither"], {})
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_settings([], {variable: "neither"})
    for choice in spec(name).choices:  # each is taken, and --help names it
        assert getattr(load_settings([flag, choice, *NEEDS.get((name, choice), [])], {}), name) == choice
        assert choice in spec(name).help


def test_takeover_says_what_it_needs() -> None:
    with pytest.raises(SystemExit, match="--takeover needs --redis-url"):
        load_settings(["--takeover", "continue"], {})
    with pytest.raises(SystemExit, match="--takeover background needs --upstream-api responses"):
        load_settings(["--takeover", "background", "--redis-url", "redis://127.0.0.1:6379/0", "--upstream-url",
                       "http://127.0.0.1:8000/v1"], {})
    with pytest.raises(SystemExit, match="--takeover continue needs --upstream-api chat"):
        load_settings(["--takeover", "continue", "--redis-url", "redis://127.0.0.1:6379/0", "--upstream-api",
                       "responses"], {})
    with pytest.raises(SystemExit, match="--takeover background needs --upstream-url: the node that takes"):
        load_settings(["--takeover", "background", "--redis-url", "redis://127.0.0.1:6379/0", "--upstream-api",
                       "responses"], {})
    both = load_settings(["--takeover", "background", "--redis-url", "redis://127.0.0.1:6379/0", "--upstream-api",
                          "responses", "--upstream-url", "http://127.0.0.1:8000/v1"], {})
    assert both.for_upstream()["background"] is True  # another node re-attaches to a background response


def test_only_the_declared_settings_have_choices() -> None:
    assert {f.name for f in dataclasses.fields(Settings) if f.metadata["spec"].choices} == set(CHOICES)


def test_lists_are_parsed_once_into_tuples() -> None:
    settings = load_settings(["--allowed-origins", " https://a.example , https://b.example,"],
                             {"WSAGENT_ALLOWED_MODELS": "big, small", "WSAGENT_GC_THRESHOLDS": "1, 2,3"})
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.allowed_models == ("big", "small") and settings.gc_thresholds == (1, 2, 3)
    assert settings.model_allowed("small") and settings.model_allowed(settings.model)
    assert not settings.model_allowed("other") and Settings(allowed_models="*").model_allowed("other")  # type: ignore[arg-type]
    # an embedder's text, directly or through dataclasses.replace, is parsed the same way
    assert Settings(allowed_origins="x, y").allowed_origins == ("x", "y")  # type: ignore[arg-type]
    assert dataclasses.replace(settings, allowed_models="").allowed_models == ()  # type: ignore[arg-type]


def test_gc_thresholds_as_before() -> None:
    assert load_settings([], {}).gc_thresholds == (50000, 20, 100)
    assert load_settings(["--gc-thresholds", ""], {}).gc_thresholds is None  # CPython's own
    assert load_settings([], {"WSAGENT_GC_THRESHOLDS": ""}).gc_thresholds == (50000, 20, 100)  # empty: unset
    for bad in (["--gc-thresholds", "1,2"], ["--gc-thresholds", "1,2,x"]):
        with pytest.raises(SystemExit, match="--gc-thresholds takes three whole numbers, like 50000,20,100"):
            load_settings(bad, {})
    with pytest.raises(SystemExit, match="--gc-thresholds takes three whole numbers"):
        load_settings([], {"WSAGENT_GC_THRESHOLDS": "1,2,3,4"})


def test_scalars_are_blamed_on_their_source() -> None:
    with pytest.raises(SystemExit, match="WSAGENT_SIM_SWITCHES: not a boolean: 'maybe'"):
        load_settings([], {"WSAGENT_SIM_SWITCHES": "maybe"})
    with pytest.raises(SystemExit) as info:
        load_settings(["--port", "x"], {})
    assert info.value.code == 2  # argparse's own message, as ever


def test_help_shows_lists_as_their_flags_take_them() -> None:
    help_text = " ".join(build_parser().format_help().split())
    assert "[WSAGENT_GC_THRESHOLDS] (default: 50000,20,100)" in help_text
    assert "[WSAGENT_ALLOWED_ORIGINS] (default: )" in help_text


def test_the_upstream_and_simulator_settings_are_one_object_each() -> None:
    settings = Settings(api_key="k", upstream_api="responses", model="m", connect_timeout=1, first_byte_timeout=2,
                        read_timeout=3, max_retries=4, retry_deadline=5, upstream_receive_buffer=6, sim_rate=7,
                        sim_tokens=8, sim_switches=True)
    config = UpstreamConfig(base_url="http://model.example/v1", **settings.for_upstream())
    assert (config.base_url, config.api_key, config.api, config.model, config.connect_timeout,
            config.first_byte_timeout, config.read_timeout, config.max_retries, config.retry_deadline,
            config.receive_buffer) == ("http://model.example/v1", "k", "responses", "m", 1, 2, 3, 4, 5, 6)
    simulator = SimulatorSettings(**settings.for_simulator())
    assert (simulator.rate, simulator.tokens, simulator.model, simulator.switches) == (7, 8, "m", True)


def test_a_worker_is_named_on_its_command_line() -> None:
    worker = Worker(2, "/run/user/1000/wsagent-x:y", 7)
    assert Worker.from_argv([*worker.argv(), "--port", "8000"]) == (worker, ["--port", "8000"])
    assert Worker.from_argv(["--worker", "4", "--port", "8000"]) == (None, ["--worker", "4", "--port", "8000"])
    assert load_settings(["--worker", "4", "--port", "8000"], {}).workers == 4  # still --workers, abbreviated
    with pytest.raises(SystemExit, match="expected NUMBER:READY_FD:DIRECTORY"):
        Worker.from_argv(["--as-worker", "2"])


def test_connection_ids_do_not_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSAGENT_WORKER", "3")
    assert re.fullmatch(r"c\d+", connection_id()) and re.fullmatch(r"w3-c\d+", connection_id("w3-"))


def _reuse_port(server: WsAgentServer) -> bool:
    assert server._server is not None
    return bool(server._server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


async def _open_id(server: WsAgentServer) -> str:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
        (conn,) = list(server.manager)
        return conn.id


async def test_an_inherited_worker_environment_makes_no_worker(make_server: ServerFactory,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """A process a worker started, or a shell that kept a worker's variables, took itself for a worker: it
    shared its port with SO_REUSEPORT and answered for metrics in another server's directory."""
    tmp_path.chmod(0o700)
    for name, value in {"WSAGENT_WORKER": "3", "WSAGENT_WORKER_OF": "1", "WSAGENT_WORKER_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    server = await make_server()
    assert server.worker is None and server.app.peers is None and not _reuse_port(server)
    assert list(tmp_path.iterdir()) == [] and re.fullmatch(r"c\d+", await _open_id(server))


@pytest.fixture
async def worker_server(sim: SimulatorServer, tmp_path: Path) -> AsyncIterator[WsAgentServer]:
    tmp_path.chmod(0o700)
    server = WsAgentServer(Settings(port=0), upstream_for(sim), worker=Worker(3, str(tmp_path), -1))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(drain=0)


async def test_a_server_told_it_is_a_worker_is_one(worker_server: WsAgentServer, tmp_path: Path) -> None:
    assert worker_server.app.peers is not None and _reuse_port(worker_server)
    assert socket_path(str(tmp_path), 3).is_socket()
    assert re.fullmatch(r"w3-c\d+", await _open_id(worker_server))


async def test_embedding_the_server_patches_nothing_process_wide(sim: SimulatorServer) -> None:
    """Starting the server patched asyncio's socket transport class (and so every program that embedded it);
    the collector's settings are not its to change either. ``wsagent.serve`` applies them, for itself."""
    transport = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009
    before = (vars(transport).get("_call_connection_lost"), gc.get_threshold(), gc.get_freeze_count())
    server = WsAgentServer(Settings(port=0), upstream_for(sim))
    async with server:
        await _open_id(server)
        assert (vars(transport).get("_call_connection_lost"), gc.get_threshold(), gc.get_freeze_count()) == before
    assert (vars(transport).get("_call_connection_lost"), gc.get_threshold(), gc.get_freeze_count()) == before


def test_serve_applies_the_transport_fix_to_its_own_process() -> None:
    """What embedding no longer does, ``python -m wsagent.serve`` still does for the process it owns."""
    if sys.version_info >= (3, 12):
        pytest.skip("the transport fix is for Python 3.11 alone")
    check = (
        "import asyncio, signal\n"
        "from asyncio import selector_events\n"
        "from wsagent.core.config import load_settings\n"
        "from wsagent.serve import serve_until_signalled\n"
        "async def main():\n"
        "    served = asyncio.ensure_future(serve_until_signalled(load_settings(['--port', '0'], {}), []))\n"
        "    while not getattr(selector_events._SelectorSocketTransport._call_connection_lost, 'breaks_cycle', 0):\n"
        "        await asyncio.sleep(0.01)\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    await served\n"
        "    print('patched')\n"
        "asyncio.run(main())\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "patched", result.stderr


def test_a_log_level_logging_does_not_know_is_refused_in_one_line() -> None:
    """Found by a newcomer: ``--log-level nonsense`` ended in a traceback from the logging module."""
    for argv, env in ((["--log-level", "nonsense"], {}), ([], {"WSAGENT_LOG_LEVEL": "debugg"})):
        with pytest.raises(SystemExit, match="--log-level must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"):
            load_settings(argv, env)
    assert load_settings(["--log-level", "debug"], {}).log_level == "DEBUG"  # (any case, as before)
