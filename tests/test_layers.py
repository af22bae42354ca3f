"""Imports point one way: each module may import only from its own layer or the layers below it.

A module is named by its dotted path under ``wsagent`` (``simulator.plan``; a package by its name).

The layers, bottom up (docs/architecture.md draws them):

* core, no I/O: events, the SSE decoder, the chunk interpreter, errors, metric types, tools, settings,
  renderers, what a run knows of a workflow;
* upstream: the model client, a plain completion, agents and workflows, the simulator;
* engine: runs and their logs, subscriptions, the pump from producers to runs, the broker;
* transport: connections, outboxes, compression, plain HTTP answers;
* handlers: the application context and one handler module per wire protocol;
* wiring: the route table, the server, ``serve`` and the clients.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import wsagent

LAYERS = {
    "core": {"errors", "events", "sse", "chunks", "responses_api", "tools", "metrics", "config", "tuning", "logs",
             "auth", "render", "ui_stream", "workflow_state"},
    "upstream": {"upstream", "completion", "agent", "producers", "frameworks",
                 "simulator", "simulator.settings", "simulator.plan", "simulator.schema", "simulator.chat_format",
                 "simulator.responses_format", "simulator.app", "simulator.cli", "simulator.__main__"},
    "engine": {"run", "pump", "broker", "transcripts",
               "cluster", "cluster.names", "cluster.messages", "cluster.wire", "cluster.link", "cluster.liveness",
               "cluster.replication", "cluster.follower", "cluster.clients", "cluster.broker"},
    "transport": {"connections", "compression", "http_answers"},
    "handlers": {"app", "chat", "ai_sdk", "tutorial", "pages", "status"},
    "wiring": {"router", "routes", "server", "serve", "systemd", "workers", "__init__",
               "client", "client.display", "client.stream", "client.cli", "client.__main__"},
}
ORDER = list(LAYERS)
PACKAGE = Path(wsagent.__file__).parent


def name_of(path: Path) -> str:
    """A module's name: its dotted path under ``wsagent`` (a package's ``__init__`` is the package's, but
    ``wsagent``'s own is ``__init__``)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {name_of(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    return next(ORDER.index(name) for name, modules in LAYERS.items() if module in modules)


def resolved(dotted: str) -> str:
    """The module that ``dotted`` (a path under ``wsagent``) is, or is in (``simulator.SimulatorServer``:
    ``simulator``)."""
    parts = dotted.split(".")
    while len(parts) > 1 and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every ``wsagent`` module ``path`` imports, anywhere in it (typing-only and lazy imports too)."""
    package = list(path.relative_to(PACKAGE).parts[:-1])  # where a relative import starts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("wsagent."):
                base = node.module.split(".")[1:]
            else:
                continue
            found.update(resolved(".".join([*base, alias.name])) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(resolved(a.name.partition(".")[2]) for a in node.names if a.name.startswith("wsagent."))
    return found


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) == set().union(*LAYERS.values())


def test_imports_point_down() -> None:
    upward = [f"{name} ({ORDER[layer_of(name)]}) imports {m} ({ORDER[layer_of(m)]})"
              for name, path in MODULES.items() if name != "__init__"
              for m in sorted(imports(path)) if layer_of(m) > layer_of(name)]
    assert upward == []


def test_the_import_graph_has_no_circle() -> None:
    graph = {name: imports(path) - {name} for name, path in MODULES.items() if name != "__init__"}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dependency in graph.get(module, ()):
            assert state.get(dependency) != 1, " -> ".join([*path, module, dependency])
            if dependency not in state:
                visit(dependency, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_sse_decoder_loads_nothing_of_the_server() -> None:
    code = ("import sys, wsagent.sse; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('jwt', 'aiohttp', 'websockets') or m.startswith('wsagent.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['wsagent.sse']"


TESTS = Path(__file__).parent


def imported_test_modules(path: Path) -> set[str]:
    """The test modules (``test_*`` in tests/) that ``path``, a module in tests/, imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "tests" or (node.module or "").startswith("tests."):
                module = (node.module or "").removeprefix("tests").lstrip(".") if node.level == 0 else node.module
                # ``from .test_x import y`` names test_x; ``from . import test_x`` (module None) names the aliases
                names = [module.partition(".")[0]] if module else [alias.name for alias in node.names]
                found.update(name for name in names if name.startswith("test_"))
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("tests.test_"))
    return found


def test_no_test_module_imports_another() -> None:
    """What more than one test module uses is in tests/helpers.py (fixtures in conftest.py), never taken from
    another test module: each test module stands alone."""
    modules = sorted(TESTS.glob("*.py"))
    assert TESTS / "helpers.py" in modules and TESTS / "test_layers.py" in modules
    offenders = {path.name: imported for path in modules if (imported := imported_test_modules(path))}
    assert offenders == {}
