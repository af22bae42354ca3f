"""Instructions a server spends per one-token run, counted by valgrind's callgrind: a start path's cost to 0.3 %.

``scripts/bench.py --starts`` measures server CPU per run, and moves by a tenth to a third between rounds on
this machine (355 to 505 µs for the same code), so a change that saves 5 % cannot be seen there. Callgrind
counts the instructions the server process executes in user space; the same code gave 1,553,565 and 1,558,832
per run in two runs. (It leaves out the kernel's share: the system calls, the same for every server here.)

    python scripts/instructions.py                     # this tree, aiohttp's relay and the floor
    python scripts/instructions.py --before ../old      # and another checkout of wsagent beside them

Each server runs under ``valgrind --tool=callgrind`` (Debian's valgrind; 40 s a server), streaming from the
simulator, with the asyncio event loop (uvloop's C code would be counted too, and differs from peer to peer).
After a warm-up of the same size, the counters are zeroed, ``clients`` sockets ask ``prompts`` one-token
prompts each, in turn (``bench.starts``), and the counters are read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # (the benchmark's servers, load and helpers)

ROOT = Path(__file__).resolve().parent.parent
PEERS = {
    "aiohttp": [sys.executable, str(ROOT / "scripts" / "peer_aiohttp.py"), "--port", "PORT"],
    "floor": [sys.executable, str(ROOT / "scripts" / "peer_floor.py"), "--port", "PORT"],
}


def wsagent(tree: Path) -> tuple[list[str], dict[str, str]]:
    """wsagent from ``tree`` (-P: that tree, not the working directory, first on the path)."""
    return [sys.executable, "-P", *bench.WSAGENT[1:], "--event-loop", "asyncio"], {"PYTHONPATH": str(tree)}


async def count(command: list[str], env: dict[str, str], upstream: str, clients: int, prompts: int,
                out: Path) -> float:
    """Instructions per run of the server ``command`` starts."""
    port = bench.free_port()
    command = [part.replace("PORT", str(port)).replace("UPSTREAM", upstream) for part in command]
    process = await asyncio.create_subprocess_exec(
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command,
        env={**os.environ, "BENCH_UPSTREAM_URL": upstream, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.STARTED.append(process)
    try:
        await bench.wait_port(port, process, limit=120)  # (Python starts 50 times slower under callgrind)
        server = bench.Server("counted", process, port)
        await bench.starts(server, clients, prompts)  # first-use allocations, imports, connection pools
        control(process.pid, "--zero")
        await bench.starts(server, clients, prompts)
        control(process.pid, "--dump")  # (returns once the dump is written)
        dumps = sorted(out.parent.glob(f"{out.name}.*"))
        totals = [int(line.split()[1]) for line in dumps[-1].read_text().splitlines()
                  if line.startswith(("summary:", "totals:"))]
        return totals[-1] / (clients * prompts)
    finally:
        process.terminate()
        await bench.reap([process], 15)


def control(pid: int, action: str) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True, timeout=60)


async def main(args: argparse.Namespace) -> None:
    servers: dict[str, tuple[list[str], dict[str, str]]] = {"wsagent": wsagent(ROOT)}
    if args.before:
        servers["wsagent, before"] = wsagent(args.before.resolve())
    servers.update({name: (command, {}) for name, command in PEERS.items()})
    sim_port = bench.free_port()
    upstream = f"http://127.0.0.1:{sim_port}/v1"
    sim = await bench.start("simulator", [sys.executable, "-m", "wsagent.simulator", "--switches", "--port",
                                          str(sim_port), "--rate", "0", "--no-reasoning"], sim_port)
    counts: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for n, (name, (command, env)) in enumerate(servers.items()):
                started = time.monotonic()
                counts[name] = await count(command, env, upstream, args.clients, args.prompts,
                                           Path(scratch) / f"callgrind.{n}")
                print(f"  {name}: {counts[name]:,.0f} instructions per one-token run "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        sim.process.terminate()
        await bench.reap([sim.process], 15)
    floor = counts["floor"]
    print("\n| instructions per one-token run | " + " | ".join(counts) + " |")
    print("| --- |" + " ---: |" * len(counts))
    print("| count | " + " | ".join(f"{c:,.0f}" for c in counts.values()) + " |")
    print("| / floor | " + " | ".join(f"{c / floor:.2f}" for c in counts.values()) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--before", type=Path, metavar="TREE", help="also count wsagent from another checkout")
    parser.add_argument("--clients", type=int, default=50, help="sockets, each asking in turn (default 50)")
    parser.add_argument("--prompts", type=int, default=10, help="one-token prompts per socket (default 10)")
    arguments = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    asyncio.run(main(arguments))
