"""Soak: many clients run, cancel, drop, reconnect and resume at random against one wsagent server.

    python scripts/soak.py --clients 100 --seconds 300      # the 5-minute soak
    python scripts/soak.py --clients 20 --seconds 30        # what CI runs (tests/test_soak.py)
    python scripts/soak.py --clients 100 --seconds 300 --hostile   # with early cancels, hostile names, churn

It starts the simulated model (``python -m wsagent.simulator --switches``) and ``python -m
wsagent.serve`` (with a 5 s resume grace and AI SDK grace: finished runs are kept that long, so what
they hold is in place after the warm-up) as processes of their own, then each client loops until
the time is up, doing one of:

* **run**: a run to its end; every character is checked against the simulator's deterministic
  answer to that prompt (fetched once per prompt, straight from the simulator);
* **cancel**: a run cancelled after a few tokens; it must end ``cancelled``, its text a prefix of
  the answer;
* **drop**: the socket is cut (TCP reset) after a few tokens, a new one resumes with the run's key
  and the last ``seq`` seen, and the whole answer must arrive exactly once.

With ``--hostile``, clients also do what an attacker (or a fast page) does, in the same traffic:

* **early-cancel**: ``run`` and ``cancel`` in one TCP write (the server reads both at once); the
  run must still end with exactly one terminal event;
* **names**: a run whose id holds a lone surrogate or a colon, and whose prompt holds a lone
  surrogate; it must stream to its end (the id answered with U+FFFD for the surrogate);
* **churn**: an AI SDK socket sends two chats, aborts one in the same write, and closes at once
  (the other goes on for ``--ai-sdk-grace`` without a socket).

Every run's ``seq`` must go 1, 2, 3... with no gap or repeat across a resume, and end with exactly
one terminal event, and once every client is gone the server must come back to ``runs_active`` 0
(``/healthz``). It prints the server's RSS every few seconds and, at the end, the counts: runs by
kind, characters checked, lost or wrong characters, ``seq`` anomalies, runs without a terminal
event, runs left in flight, and RSS growth after the warm-up (the first fifth of the time, at most a
minute). Exit status 1 if any count is not 0 or RSS grew by 10 % or more after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, rss_bytes, start, stop_started

from wsagent.upstream.model import UpstreamClient, UpstreamConfig

TERMINAL = ("done", "error", "cancelled")
PROMPTS = [f"soak topic {n} sim:tokens={20 + 13 * n} sim:rate=200" for n in range(12)]


class Tally:
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.chars = 0
        self.lost = 0
        self.seq_anomalies = 0
        self.no_terminal = 0
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)


class RunView:
    """What one client saw of one run, across sockets."""

    def __init__(self, run_id: str) -> None:
        self.id = run_id
        self.key: str | None = None
        self.seqs: list[int] = []
        self.text: list[str] = []
        self.terminal: dict[str, Any] | None = None

    async def read(self, ws: ClientConnection, until_tokens: int | None = None) -> None:
        """Read this run's events until its terminal event (or ``until_tokens`` token events)."""
        tokens = 0
        async with asyncio.timeout(60):
            while self.terminal is None:
                event = json.loads(await ws.recv())
                if event.get("id") != self.id:
                    continue
                if "seq" not in event:
                    raise RuntimeError(f"refused: {event}")
                self.seqs.append(event["seq"])
                if event["type"] == "start":
                    self.key = event["key"]
                elif event["type"] == "token":
                    self.text.append(event["content"])
                    tokens += 1
                elif event["type"] in TERMINAL:
                    self.terminal = event
                if until_tokens is not None and tokens >= until_tokens:
                    return


async def expected_answers(upstream_url: str) -> dict[str, str]:
    client = UpstreamClient(UpstreamConfig(base_url=upstream_url))
    try:
        answers = {}
        for prompt in [*PROMPTS, *(f"{p} \ufffd" for p in PROMPTS)]:  # as sent, and as a lone surrogate arrives
            parts = [e.text async for e in client.stream([{"role": "user", "content": prompt}])
                     if getattr(e, "kind", None) == "content"]
            answers[prompt] = "".join(parts)
        return answers
    finally:
        await client.close()


def check(view: RunView, expected: str, kind: str, tally: Tally) -> None:
    tally.kinds[kind] += 1
    if view.terminal is None:
        tally.no_terminal += 1
        tally.fail(f"{view.id}: no terminal event")
        return
    if view.seqs != list(range(1, len(view.seqs) + 1)):
        tally.seq_anomalies += 1
        tally.fail(f"{view.id}: seq {view.seqs[:5]}...{view.seqs[-5:]}")
    text = "".join(view.text)
    tally.chars += len(text)
    outcome = view.terminal["type"]
    if kind in ("cancel", "early-cancel") and outcome in ("cancelled", "done"):
        if not expected.startswith(text):
            tally.lost += 1
            tally.fail(f"{view.id}: cancelled text is not a prefix of the answer")
        return
    if outcome != "done" or text != expected:
        tally.lost += max(1, abs(len(expected) - len(text)))
        tally.fail(f"{view.id}: {outcome}, {len(text)} of {len(expected)} characters")


def write_together(ws: ClientConnection, *messages: dict[str, Any]) -> None:
    """``messages`` as text frames in one TCP write: the server reads them at once."""
    for message in messages:
        ws.protocol.send_text(json.dumps(message).encode())
    ws.send_data()


async def churn(base: str, number: int, count: int) -> None:
    """An AI SDK page that sends two chats, aborts the first in the same write, and is gone."""
    async with connect(f"{base}/ws/ai-sdk", open_timeout=10, close_timeout=2) as ws:
        messages = [{"id": "m", "role": "user", "parts": [{"type": "text", "text": PROMPTS[count % len(PROMPTS)]}]}]
        write_together(ws, *({"type": "send", "requestId": f"q{n}", "id": f"churn-{number}-{count}-{n}",
                              "trigger": "submit-message", "messages": messages} for n in (1, 2)),
                       {"type": "abort", "requestId": "q1"})


async def client(url: str, number: int, deadline: float, answers: dict[str, str], tally: Tally,
                 hostile: bool = False) -> None:
    rng = random.Random(number)
    count = 0
    kinds, weights = (["run", "cancel", "drop", "early-cancel", "names", "churn"], [5, 2, 3, 2, 2, 2]) if hostile \
        else (["run", "cancel", "drop"], [5, 2, 3])
    while time.monotonic() < deadline:
        count += 1
        prompt = rng.choice(PROMPTS)
        kind = rng.choices(kinds, weights)[0]
        if kind == "churn":
            tally.kinds[kind] += 1
            try:
                await churn(url.rpartition("/ws")[0], number, count)
            except OSError as exc:
                tally.fail(f"churn {number}-{count}: {exc!r}"[:200])
            continue
        view = RunView(f"c{number}-{count}")
        request: dict[str, Any] = {"type": "run", "id": view.id, "prompt": prompt}
        if kind == "names":
            request = {**request, "id": f"\ud800:{view.id}", "prompt": f"{prompt} \udc00"}
            view.id = f"\ufffd:{view.id}"
            prompt = f"{prompt} \ufffd"
        ws = await connect(url, open_timeout=10, close_timeout=2, max_size=None)
        try:
            if kind == "early-cancel":
                write_together(ws, request, {"type": "cancel", "id": view.id})
                await view.read(ws)
            else:
                await ws.send(json.dumps(request))
            if kind in ("run", "names"):
                await view.read(ws)
            elif kind == "cancel":
                await view.read(ws, until_tokens=rng.randint(1, 10))
                if view.terminal is None:
                    await ws.send(json.dumps({"type": "cancel", "id": view.id}))
                    await view.read(ws)
            else:
                await view.read(ws, until_tokens=rng.randint(1, 10))
                if view.terminal is None:
                    ws.transport.abort()
                    ws = await connect(url, open_timeout=10, close_timeout=2, max_size=None)
                    await ws.send(json.dumps({"type": "resume", "id": view.id, "key": view.key,
                                              "after": view.seqs[-1]}))
                    await view.read(ws)
        except (TimeoutError, RuntimeError, OSError) as exc:
            tally.fail(f"{view.id}: {exc!r}"[:200])
        finally:
            await ws.close()
        check(view, answers[prompt], kind, tally)


async def runs_active(port: int) -> int:
    """``runs_active`` of ``/healthz`` once no run is in flight, or after 30 s (what is left then).

    Runs a client left go on for their grace (``--resume-grace``, ``--ai-sdk-grace``) or to their
    end; the answers here take under a second, so 30 s is a bound, not a guess at a pause."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 30
        while True:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                active = int((await response.json())["runs_active"])
            if not active or time.monotonic() > deadline:
                return active
            await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> int:
    sim_port, ws_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{sim_port}/v1"
    sim = await start("simulator", [sys.executable, "-m", "wsagent.simulator", "--switches", "--port",
                                    str(sim_port)], sim_port)
    server = await start("wsagent", [sys.executable, "-m", "wsagent.serve", "--port", str(ws_port),
                                     "--upstream-url", upstream, "--log-level", "WARNING", "--resume-grace", "5",
                                     "--ai-sdk-grace", "5",
                                     "--max-connections-per-ip", "100000", "--max-runs-per-user", "100000",
                                     "--max-runs-per-ip", "0"], ws_port)
    tally = Tally()
    curve: list[tuple[float, int]] = []
    try:
        answers = await expected_answers(upstream)
        began = time.monotonic()
        deadline = began + args.seconds

        async def sample() -> None:
            while True:
                curve.append((time.monotonic() - began, rss_bytes(server.pid)))
                print(f"  {curve[-1][0]:6.1f}s  server RSS {curve[-1][1] / 2**20:7.1f} MiB", flush=True)
                await asyncio.sleep(args.every)

        sampler = asyncio.get_running_loop().create_task(sample())
        await asyncio.gather(*(client(server.url, n, deadline, answers, tally, args.hostile)
                               for n in range(args.clients)))
        sampler.cancel()
        curve.append((time.monotonic() - began, rss_bytes(server.pid)))
        active = await runs_active(ws_port)
        print(f"runs_active when every client is gone: {active}")
        if active:
            tally.fail(f"{active} runs still in flight with every client gone")
    finally:
        for process in (server.process, sim.process):
            process.terminate()
            await process.wait()
    warm = min(60.0, args.seconds / 5)
    after_warm = [rss for t, rss in curve if t >= warm] or [curve[-1][1]]
    growth = (curve[-1][1] - after_warm[0]) / after_warm[0]
    print(f"runs: {dict(tally.kinds)} ({sum(tally.kinds.values())} in all); characters checked: {tally.chars:,}")
    print(f"lost or wrong: {tally.lost}; seq anomalies: {tally.seq_anomalies}; "
          f"runs without a terminal event: {tally.no_terminal}")
    print(f"server RSS: {after_warm[0] / 2**20:.1f} MiB after {warm:.0f}s of warm-up, "
          f"{curve[-1][1] / 2**20:.1f} MiB at the end ({growth:+.1%})")
    for failure in tally.failures:
        print(f"  {failure}")
    ok = not (tally.lost or tally.seq_anomalies or tally.no_terminal or tally.failures) and growth < 0.10
    print("soak passed" if ok else "soak FAILED")
    return 0 if ok else 1


async def soak_then_stop(args: argparse.Namespace) -> int:
    try:
        return await soak(args)
    finally:
        await stop_started()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--hostile", action="store_true",
                        help="mix in early cancels, lone surrogates and colons in names, and churned AI SDK sockets")
    sys.exit(asyncio.run(soak_then_stop(parser.parse_args())))


if __name__ == "__main__":
    main()
