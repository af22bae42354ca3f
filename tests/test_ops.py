"""Running it for real: systemd unit and notify protocol, socket activation, SIGHUP, metrics, logs,
transcripts, several worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from wsagent.core.tuning import tune_malloc
from wsagent.serve import restart_delay
from wsagent.wiring.server import WsAgentServer

from .helpers import ROOT, ServerFactory, run_events, ws_connect
from .processes import Notifications, free_port


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    n = Notifications()
    yield n
    n.close()


# What systemd does for socket activation: the socket as fd 3, LISTEN_FDS, and LISTEN_PID set to the
# pid that execs the server (os.execv keeps it).
ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def spawn(args: list[str], env: dict[str, str] | None = None, activate_fd: int | None = None,
          ) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "WSAGENT_SIM_RATE": "200", "WSAGENT_SIM_SWITCHES": "1", **(env or {})}
    command = ["-m", "wsagent.serve", "--port", "0", *args]
    if activate_fd is None:
        return subprocess.Popen([sys.executable, *command], env=full_env, stderr=subprocess.PIPE, cwd=ROOT)
    return subprocess.Popen([sys.executable, "-c", ACTIVATE, str(activate_fd), *command], env=full_env,
                            stderr=subprocess.PIPE, pass_fds=(activate_fd,), cwd=ROOT)


def url_from(status: str) -> str:
    return status.split("listening on ", 1)[1].strip() if "listening on " in status else status.split(" on ")[-1]


async def finish(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, process.wait, 30)
    assert process.stderr is not None
    return code, process.stderr.read().decode()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The unit as the installer writes it for a prefix of one's own (``WSAGENT_PREFIX``): every path in it
    (``Documentation=`` pointed at /opt/wsagent whatever the prefix), and systemd accepts it."""
    prefix = tmp_path / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "python").symlink_to(sys.executable)
    unit = subprocess.run(["bash", str(ROOT / "scripts/install-systemd.sh"), "--print-unit"], check=True,
                          capture_output=True, text=True, env={**os.environ, "WSAGENT_PREFIX": str(prefix)}).stdout
    assert "/opt/wsagent" not in unit and f"Documentation=file://{prefix}/" in unit
    (tmp_path / "wsagent.service").write_text(unit)
    shutil.copy(ROOT / "scripts/wsagent.socket", tmp_path / "wsagent.socket")
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "wsagent.service"),
                             str(tmp_path / "wsagent.socket")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in unit and "DynamicUser=yes" in unit and "Restart=on-failure" in unit
    # with the cluster drop-in (a section may appear twice in a unit: systemd reads them as one)
    (tmp_path / "wsagent.service").write_text(unit + (ROOT / "scripts/wsagent-cluster.conf").read_text())
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "wsagent.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


async def test_notify_ready_watchdog_stopping_and_drain(notifications: Notifications) -> None:
    process = spawn(["--drain-timeout", "0.2"], {"NOTIFY_SOCKET": notifications.path, "WATCHDOG_USEC": "200000"})
    ready = await notifications.expect("READY=1")
    await notifications.expect("WATCHDOG=1")
    async with connect(url_from(ready) + "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": "long sim:rate=50 sim:tokens=100000"}))
        assert json.loads(await ws.recv())["type"] == "start"
        process.send_signal(signal.SIGTERM)
        await notifications.expect("STOPPING=1")
        events = await run_events(ws, "r")
        assert events[-1]["type"] == "cancelled"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    code, logs = await finish(process)
    assert code == 0, logs
    assert "open c1 /ws/chat" in logs and "code=1001" in logs


async def test_socket_activation(notifications: Notifications) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    process = spawn([], {"NOTIFY_SOCKET": notifications.path}, activate_fd=fd)
    listener.close()
    await notifications.expect("READY=1")
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send("activated")
        assert await ws.recv() == "ACTIVATED"
    process.send_signal(signal.SIGTERM)
    assert (await finish(process))[0] == 0


async def test_sighup_reloads_secret_and_limits(notifications: Notifications, tmp_path: Path) -> None:
    env_file = tmp_path / "wsagent.env"
    env_file.write_text("WSAGENT_JWT_SECRET=first-secret-long-enough-for-hs256-use\n")
    process = spawn(["--env-file", str(env_file)], {"NOTIFY_SOCKET": notifications.path})
    url = url_from(await notifications.expect("READY=1"))

    def token(secret: str) -> str:
        return jwt.encode({"user_id": "u", "exp": int(time.time()) + 60}, secret, algorithm="HS256")

    async def close_code(secret: str) -> int | None:
        async with connect(f"{url}/ws/secure?token={token(secret)}") as ws:
            try:  # a refused token may close the socket before the ping is even sent (seen with uvloop)
                await ws.send(json.dumps({"type": "ping"}))
                await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None
            return None

    assert await close_code("first-secret-long-enough-for-hs256-use") is None
    env_file.write_text('WSAGENT_JWT_SECRET="second-secret-long-enough-for-hs256-use"\nWSAGENT_MODEL=other\n')
    process.send_signal(signal.SIGHUP)
    await notifications.expect("RELOADING=1")
    await notifications.expect("READY=1")
    assert await close_code("first-secret-long-enough-for-hs256-use") == 4001
    assert await close_code("second-secret-long-enough-for-hs256-use") is None
    process.send_signal(signal.SIGTERM)
    code, logs = await finish(process)
    assert code == 0 and "needs a restart: model" in logs and "second-secret" not in logs


async def two_workers(notifications: Notifications, drain: float) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m wsagent.serve --workers 2`` on a free port, once systemd would be told it is ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "wsagent.serve", "--port", str(port), "--workers", "2", "--drain-timeout", str(drain)],
        env={**os.environ, "NOTIFY_SOCKET": notifications.path, "WSAGENT_SIM_SWITCHES": "1"}, stderr=subprocess.PIPE,
        cwd=ROOT)
    await notifications.expect("READY=1")
    return process, port


async def test_workers_share_the_port_and_each_drains(notifications: Notifications) -> None:
    process, port = await two_workers(notifications, 0.2)
    workers: set[int] = set()
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            async with http.get(f"http://127.0.0.1:{port}/healthz", headers={"Connection": "close"}) as response:
                workers.add((await response.json())["worker"])
    assert len(workers) == 2
    sockets: dict[str, Any] = {}
    for n in range(40):
        if len(sockets) == 2:
            break
        ws = await connect(f"ws://127.0.0.1:{port}/ws/chat")
        assert ws.response is not None
        worker = ws.response.headers["X-Wsagent-Worker"]
        if worker in sockets:
            await ws.close()
            continue
        await ws.send(json.dumps({"type": "run", "id": f"r{n}", "prompt": "long sim:rate=50 sim:tokens=100000"}))
        assert json.loads(await ws.recv())["type"] == "start"
        sockets[worker] = (ws, f"r{n}")
    assert len(sockets) == 2
    process.send_signal(signal.SIGTERM)
    for ws, run_id in sockets.values():
        assert (await run_events(ws, run_id))[-1]["type"] == "cancelled"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    code, logs = await finish(process)
    assert code == 0 and logs.count("wsagent stopped") == 2
    assert logs.count("2 workers without --redis-url: resume, attach, cancel, client ids and per-user limits are "
                      "per process") == 1
    stopped = [line for line in logs.splitlines() if "wsagent stopped" in line]
    assert sorted(line.split()[3] for line in stopped) == ["w1", "w2"]  # which worker said it
    opened = [line.split(" open ")[1].split()[0] for line in logs.splitlines() if " open " in line]
    assert len(opened) == len(set(opened)) >= 2 and {o.split("-")[0] for o in opened} == {"w1", "w2"}


async def test_json_logs_carry_connection_and_run_ids(notifications: Notifications) -> None:
    process = spawn(["--log-format", "json"], {"NOTIFY_SOCKET": notifications.path})
    url = url_from(await notifications.expect("READY=1"))
    async with connect(url + "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "logged", "prompt": "hi sim:tokens=3"}))
        await run_events(ws, "logged")
    process.send_signal(signal.SIGTERM)
    code, logs = await finish(process)
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert code == 0 and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r.get("run") == "logged" and r.get("conn") == "c1" and "end" in r["message"] for r in records)
    assert any(r.get("conn") == "c1" and r["message"].startswith("close c1") for r in records)


async def test_metrics(make_server: ServerFactory) -> None:
    server = await make_server(slow_client_timeout=0.3, close_timeout=0.3)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "a", "prompt": "count me sim:tokens=10"}))
        await run_events(ws, "a")
        await ws.send(json.dumps({"type": "run", "id": "b", "prompt": "stop me sim:rate=50 sim:tokens=10000"}))
        while json.loads(await ws.recv())["type"] != "token":
            pass
        await ws.send(json.dumps({"type": "cancel", "id": "b"}))
        await run_events(ws, "b")
        await ws.send(json.dumps({"type": "run", "id": "c", "prompt": "x sim:status=429"}))
        await run_events(ws, "c")
        text = await scrape(server)
    assert 'wsagent_connections_open{route="/ws/chat"} 1' in text
    assert 'wsagent_connections_total{route="/ws/chat"} 1' in text
    assert 'wsagent_runs_total{outcome="done"} 1' in text and 'wsagent_runs_total{outcome="cancelled"} 1' in text
    assert 'wsagent_runs_total{outcome="error"} 1' in text
    assert 'wsagent_cancellations_total{reason="cancelled by client"} 1' in text
    assert 'wsagent_upstream_requests_total{status="200"} 2' in text
    assert 'wsagent_upstream_requests_total{status="429"} 3' in text  # the first try and two retries
    assert "wsagent_runs_active 0" in text and "wsagent_bytes_buffered 0" in text
    relayed = int(next(line.split()[1] for line in text.splitlines() if line.startswith("wsagent_tokens_relayed")))
    assert relayed >= 10
    assert _value(text, "wsagent_upstream_ttft_seconds_count") == 2
    assert _value(text, "wsagent_relay_latency_seconds_count") >= 3
    async with ws_connect(server, "/ws/chat", compression=None, max_queue=1) as stuck:
        flood = "x sim:rate=0 sim:tokens=100000 sim:pad=1000"
        await stuck.send(json.dumps({"type": "run", "id": "s", "prompt": flood}))
        stuck.transport.pause_reading()
        conn = next(c for c in server.manager if c.path == "/ws/chat")
        await asyncio.wait_for(conn.ws.wait_closed(), 10)
        stuck.transport.abort()
    assert "wsagent_slow_client_closes_total 1" in await scrape(server)


def _value(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


async def scrape(server: WsAgentServer) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            return await response.text()


async def test_transcripts(make_server: ServerFactory, tmp_path: Path) -> None:
    server = await make_server(transcripts_dir=str(tmp_path))
    async with ws_connect(server, "/ws/chat") as ws:
        conn_id = next(iter(server.manager)).id
        await ws.send(json.dumps({"type": "run", "id": "t/1", "prompt": "record me sim:tokens=5"}))
        sent = await run_events(ws, "t/1")
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1 and "t_1" in files[0].name
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert lines[0]["transcript"] == {"run": "t/1", "conn": conn_id, "user": None}
    events = [line["event"] for line in lines[1:]]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "done" and all(line["t"] > 1e9 for line in lines)
    assert "".join(e["content"] for e in events if e["type"] == "token") == \
        "".join(e["content"] for e in sent if e["type"] == "token")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_malloc_tuning_applies_on_glibc() -> None:
    """``python -m wsagent.serve`` makes glibc serve asyncio's 256 KiB read buffers from the heap
    (see :func:`wsagent.tuning.tune_malloc`); the benchmark measures what that saves."""
    assert tune_malloc() is True


async def test_one_scrape_reports_every_worker(notifications: Notifications) -> None:
    """With ``--workers`` a scrape saw one random worker's counts."""
    process, port = await two_workers(notifications, 0)
    done_on: set[str] = set()
    for n in range(40):
        if len(done_on) == 2:
            break
        async with connect(f"ws://127.0.0.1:{port}/ws/chat") as ws:
            assert ws.response is not None
            worker = ws.response.headers["X-Wsagent-Worker"]
            if worker in done_on:
                continue
            await ws.send(json.dumps({"type": "run", "id": f"r{n}", "prompt": "count me"}))
            assert (await run_events(ws, f"r{n}"))[-1]["type"] == "done"
            done_on.add(worker)
    assert len(done_on) == 2
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            async with http.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"}) as response:
                text = await response.text()
            assert 'wsagent_runs_total{outcome="done"} 2' in text
            assert _value(text, "wsagent_workers_answering") == 2
    process.send_signal(signal.SIGTERM)
    code, _ = await finish(process)
    assert code == 0


class Said:
    """A process's stderr, line by line as it comes (read to its end, so a full pipe never stalls it)."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._more = asyncio.Event()
        self._ended = False
        self._reader = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line.decode(errors="replace"))
            self._more.set()
        self._ended = True
        self._more.set()

    async def expect(self, text: str, after: int = 0, limit: float = 30) -> tuple[int, str]:
        """The first line from line ``after`` on holding ``text`` (its index too); fails if the output ends
        first or nothing came within ``limit`` seconds."""
        seen = after
        try:
            async with asyncio.timeout(limit):
                while True:
                    for index in range(seen, len(self.lines)):
                        if text in self.lines[index]:
                            return index, self.lines[index]
                    seen = len(self.lines)
                    if self._ended:
                        raise AssertionError(f"the output ended without {text!r}:\n{self.text}")
                    self._more.clear()
                    await self._more.wait()
        except TimeoutError:
            raise AssertionError(f"no {text!r} within {limit:g} s:\n{self.text}") from None

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def close(self) -> None:
        await self._reader


def children_of(pid: int) -> set[int]:
    """The processes ``pid`` started and that have not been reaped (``/proc/<pid>/task/*/children``)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


@contextlib.asynccontextmanager
async def supervisor(command: list[str], env: dict[str, str]) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                                                                      Said, int]]:
    """``command`` (a ``--workers 2`` server on a free port, ``{port}`` in it filled in) once it says its workers
    listen; SIGTERM and a wait on the way out (if the test did not stop it)."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(part.replace("{port}", str(port)) for part in command), cwd=ROOT, env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    said = Said(process.stderr)
    try:
        await said.expect("2 workers listening on", limit=60)
        yield process, said, port
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            await process.wait()
        await said.close()


SERVE_TWO = [sys.executable, "-m", "wsagent.serve", "--port", "{port}", "--workers", "2", "--drain-timeout", "0"]


async def answering(port: int) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"}) as response:
            return _value(await response.text(), "wsagent_workers_answering")


async def test_a_killed_worker_is_logged_cleaned_up_and_restarted(tmp_path: Path) -> None:
    """A worker killed with SIGKILL stayed dead, unlogged, its socket left for every scrape to try."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    async with supervisor(SERVE_TWO, {"XDG_RUNTIME_DIR": str(runtime)}) as (process, said, port):
        workers = children_of(process.pid)
        assert len(workers) == 2
        (mesh,) = runtime.iterdir()
        inodes = {path.name: path.stat().st_ino for path in mesh.glob("w*.sock")}
        assert sorted(inodes) == ["w1.sock", "w2.sock"]
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        at, died = await said.expect(f"(pid {victim})")
        assert "died" in died and "killed by signal SIGKILL" in died and "ERROR" in died
        number = died.split("worker w", 1)[1].split()[0]
        sock = mesh / f"w{number}.sock"
        # its socket is gone (or is already the new worker's)
        assert not sock.exists() or sock.stat().st_ino != inodes[sock.name]
        _, restarting = await said.expect(f"restarting worker w{number} in ", after=at)
        _, restarted = await said.expect(f"worker w{number} restarted", after=at)
        new = int(restarted.split("(pid ", 1)[1].split(")")[0])
        assert children_of(process.pid) == workers - {victim} | {new}
        for _ in range(6):  # whichever worker takes the scrape, both answer
            assert await answering(port) == 2
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert said.text.count("wsagent stopped") == 2 and not list(runtime.iterdir())


async def test_restarts_back_off_and_stop_at_shutdown(tmp_path: Path) -> None:
    """A worker that dies again at once is restarted later each time (jittered, capped); SIGTERM while a
    restart waits stops it all the same."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    async with supervisor(SERVE_TWO, {"XDG_RUNTIME_DIR": str(runtime)}) as (process, said, _):
        delays: list[float] = []
        at = 0
        victim = max(children_of(process.pid))
        for _ in range(3):  # the same worker each time: killed as soon as it is back
            os.kill(victim, signal.SIGKILL)
            at, _ = await said.expect(f"(pid {victim})", after=at)
            at, line = await said.expect("restarting worker w", after=at)
            delays.append(float(line.split(" in ", 1)[1].split(" s")[0]))
            if len(delays) < 3:
                at, line = await said.expect("restarted (pid ", after=at)
                victim = int(line.split("(pid ", 1)[1].split(")")[0])
        assert delays[0] <= delays[1] <= delays[2] and delays[0] < delays[2], delays
        process.send_signal(signal.SIGTERM)  # the third restart is still waiting
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert said.text.count("wsagent stopped") == 1 and not any("restarted (pid" in line for line in said.lines[at:])
    assert not list(runtime.iterdir())


async def test_worker_mesh_dir_is_private_fresh_and_removed(tmp_path: Path) -> None:
    """Another local user who made ``$TMPDIR/wsagent-<supervisor pid>`` first stopped every worker
    ("belongs to another user"). The workers' directory is now made fresh with an unpredictable name."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # sh execs the server, so the squatter's directory is named after the supervisor's own pid
    squat = ('mkdir "$TMPDIR/wsagent-$$" && chmod 0777 "$TMPDIR/wsagent-$$" && '
             '{ [ "$(id -u)" != 0 ] || chown 65534:65534 "$TMPDIR/wsagent-$$"; } && exec "$0" "$@"')
    env = {"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": ""}
    async with supervisor(["sh", "-c", squat, *SERVE_TWO], env) as (process, said, port):
        squatter = tmp / f"wsagent-{process.pid}"
        meshes = [path for path in tmp.iterdir() if path != squatter]
        assert squatter.is_dir() and len(meshes) == 1, list(tmp.iterdir())
        mesh = meshes[0]
        info = mesh.stat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert sorted(path.name for path in mesh.iterdir()) == ["w1.sock", "w2.sock"]
        assert not list(squatter.iterdir())
        assert await answering(port) == 2
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert list(tmp.iterdir()) == [squatter]


async def test_worker_mesh_dir_prefers_xdg_runtime_dir(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    async with supervisor(SERVE_TWO, {"XDG_RUNTIME_DIR": str(runtime), "TMPDIR": str(tmp)}) as (process, _, _):
        (mesh,) = runtime.iterdir()
        assert stat.S_IMODE(mesh.stat().st_mode) == 0o700 and mesh.name.startswith("wsagent-")
        assert mesh.name != f"wsagent-{process.pid}" and not list(tmp.iterdir())
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert not list(runtime.iterdir())


def test_restart_delays_grow_jittered_and_capped() -> None:
    for failures in range(12):
        nominal = min(30.0, 0.5 * 2 ** failures)
        delays = {restart_delay(failures) for _ in range(50)}
        assert all(nominal / 2 <= delay <= nominal for delay in delays) and len(delays) > 1
    assert restart_delay(10_000) <= 30.0


async def test_a_worker_that_cannot_start_stops_the_server() -> None:
    """A worker that never listened is not restarted (it would fail again): the supervisor stops, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsagent.serve", "--port", str(taken.getsockname()[1]), "--workers", "2",
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert process.stderr is not None
        said = Said(process.stderr)
        try:
            await said.expect("before it was ready: stopping")
            assert await asyncio.wait_for(process.wait(), 30) == 1
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await said.close()
    assert "restart" not in said.text and "address already in use" in said.text


@pytest.mark.parametrize("module", ["wsagent.serve", "wsagent.simulator"])
def test_a_port_in_use_is_one_line_and_exit_1(module: str) -> None:
    """``python -m wsagent.simulator`` on a used port died with a traceback where ``wsagent.serve`` said one line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", module, "--port", str(port)], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert f"cannot serve on 127.0.0.1:{port}" in error


def test_a_bench_that_cannot_start_a_peer_says_what_to_run_and_leaves_nothing_running() -> None:
    """Without the Node.js peer's packages the bench died with ``ConnectionRefusedError``, and a failed run
    left every server it had started (here: the simulator) orphaned to init."""
    if (ROOT / "scripts" / "node-peer" / "node_modules").is_dir():
        pytest.skip("the Node.js peer's packages are installed here")
    mark = f"bench-test-{os.getpid()}-{time.monotonic_ns()}"
    result = subprocess.run([sys.executable, "scripts/bench.py", "--servers", "node", "--quick", "--no-cluster",
                             "--no-workers"], cwd=ROOT, env={**os.environ, "WSAGENT_BENCH_MARK": mark},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "npm ci --prefix scripts/node-peer" in result.stderr
    assert "Traceback" not in result.stderr
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if mark.encode() in environ.read_bytes():
                left.append(environ.parent.name)
    assert left == []


@pytest.mark.parametrize("spec", ["examples/agents/nosuch.py:AGENTS", "examples/agents/plain.py"])
def test_an_agents_setting_that_cannot_be_served_is_one_line(spec: str) -> None:
    """A missing file was reported as ``cannot serve on HOST:PORT: No such file``; a spec without its
    attribute as a 20-line traceback."""
    result = subprocess.run([sys.executable, "-m", "wsagent.serve", "--port", "0", "--agents", spec], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert f"--agents {spec!r}" in error and "cannot serve on" not in error
