"""README stays true: the settings table matches the code, and CI runs README's test command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from wsagent.core.config import build_parser, settings_table
from wsagent.upstream.simulator import SimulatorServer

from .helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def doc(path: str) -> str:
    """A page of the documentation, by its path from the repository's root (``docs/agents.md``)."""
    return (ROOT / path).read_text(encoding="utf-8")


def test_settings_table_is_current() -> None:
    start = README.index("<!-- settings -->\n") + len("<!-- settings -->\n")
    end = README.index("<!-- /settings -->")
    assert README[start:end].strip() == settings_table().strip()


def test_every_flag_is_in_help_and_readme() -> None:
    help_text = build_parser().format_help()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help" and not flag.startswith("--no-"):
                assert flag in help_text and f"`{flag}`" in README


def test_readme_opens_with_the_two_commands() -> None:
    blocks = README.split("```sh\n")
    assert blocks[1].startswith("python3 -m venv .venv && . .venv/bin/activate && pip install . && "
                                "python -m wsagent.serve\n")
    assert blocks[2].startswith("scripts/test.sh\n")
    assert "<!-- test-command -->" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci and "apt-get" not in ci  # CI runs exactly that command, nothing else


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_every_link_resolves() -> None:
    """README holds what a user needs first; the rest is in docs/, and every relative link (a file, a heading)
    from README or a docs page leads somewhere."""
    assert len(README.encode()) < 20_000
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"(?s)```.*?```", "", text)):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), (page.name, target)
            if anchor:
                headings = re.findall(r"(?m)^#+ (.+)$", re.sub(r"(?s)```.*?```", "", linked.read_text("utf-8")))
                assert anchor in {_anchor(h) for h in headings}, (page.name, target)


def _blocks(section: str, language: str, text: str = README) -> list[str]:
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split(f"```{language}\n")[1:]]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_quick_start_blocks_run(tmp_path: Path) -> None:
    """README's first command, as written, in a fresh copy of the source (its own ``.venv``, nothing
    installed before): it installs and serves; then every quick-start block runs."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for changed in subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout.split():  # the work tree, as it is
        (clone / changed).parent.mkdir(parents=True, exist_ok=True)
        (clone / changed).write_bytes((ROOT / changed).read_bytes())
    env = {name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{clone / '.venv' / 'bin'}:{env['PATH']}"  # the quick start's commands, in that terminal
    port = _free_port()
    env["WSAGENT_PORT"] = str(port)
    env["WSAGENT_URL"] = f"ws://localhost:{port}/ws/chat"
    first = README.split("```sh\n", 1)[1].split("```", 1)[0].strip()
    install, _, serve = first.rpartition(" && ")
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready:
        ready.bind(str(notify))
        ready.settimeout(600)  # the install, then the start
        server = subprocess.Popen(f"{install} >/dev/null && exec {serve}", shell=True, cwd=clone,
                                  env={**env, "NOTIFY_SOCKET": str(notify)}, stderr=subprocess.PIPE)
        try:
            assert ready.recv(4096).startswith(b"READY=1")
            outputs = []
            for block in _blocks("Quick start", "sh"):
                command = block.strip().replace("localhost:8000", f"localhost:{port}")
                result = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True,
                                        timeout=120)
                assert result.returncode == 0, (command, result.stdout, result.stderr)
                outputs.append(result.stdout)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    assert json.loads(outputs[0])["status"] == "ok"
    assert outputs[1].splitlines()[-1:] == ["HELLO"]  # after pip's own lines
    assert "simulated answer" in outputs[2] and "17 * 23 = 391" in outputs[3]
    assert json.loads(outputs[4].splitlines()[-1])["type"] == "done"
    assert outputs[5].rstrip().endswith("[DONE]")
    assert server.returncode == 0


async def test_python_api_example_runs(sim: SimulatorServer, tmp_path: Path) -> None:
    (example,) = _blocks("Python API", "python", doc("docs/agents.md"))
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://localhost:8001/v1", sim.base_url))
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), cwd=ROOT,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "6 * 7 = 42" in text and "'researcher':" in text and "done" in text


def test_the_test_command_names_what_it_cannot_install() -> None:
    """Run by a user who cannot install Debian packages (not root, no sudo) on a machine without them, the
    test command stops at once with one line naming them, before it installs or runs anything."""
    with tempfile.TemporaryDirectory() as where:  # a copy the other user may read, wherever the clone is
        Path(where).chmod(0o755)
        bin_dir, scripts = Path(where) / "bin", Path(where) / "scripts"
        bin_dir.mkdir()
        scripts.mkdir()
        shutil.copy(ROOT / "scripts" / "test.sh", scripts / "test.sh")
        for tool in ("dirname", "id"):  # what the script needs before its check; no redis-server, chromium, tmux
            (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
        result = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/bash",
                                 str(scripts / "test.sh")], env={"PATH": str(bin_dir)},
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("scripts/test.sh: missing Debian packages: ")
    assert all(name in line for name in ("redis-server", "chromium", "tmux", "systemd")), line
