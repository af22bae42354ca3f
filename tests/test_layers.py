"""Imports point one way: each module may import only from its own layer or the layers below it.

The layers, bottom up (docs/architecture.md draws them):

* core, no I/O: events, the SSE decoder, the chunk interpreter, errors, metric types, tools, settings,
  renderers, what a run knows of a workflow;
* upstream: the model client, agents and workflows, the simulator;
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
    "core": {"errors", "events", "sse", "chunks", "response_events", "tools", "metrics", "config", "tuning", "logs",
             "auth", "render", "ui_stream", "workflow_state"},
    "upstream": {"upstream", "agent", "producers", "frameworks", "simulator", "resp"},
    "engine": {"run", "pump", "broker", "cluster", "transcripts"},
    "transport": {"connections", "compression", "responses"},
    "handlers": {"app", "chat", "ai_sdk", "tutorial", "pages", "status"},
    "wiring": {"router", "routes", "server", "serve", "systemd", "client", "workers", "__init__"},
}
ORDER = list(LAYERS)
PACKAGE = Path(wsagent.__file__).parent


def layer_of(module: str) -> int:
    return next(ORDER.index(name) for name, modules in LAYERS.items() if module in modules)


def imports(path: Path) -> set[str]:
    """Every ``wsagent`` module ``path`` imports, anywhere in it (typing-only and lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("wsagent."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("wsagent."))
    return found


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set().union(*LAYERS.values())


def test_imports_point_down() -> None:
    upward = [f"{p.stem} ({ORDER[layer_of(p.stem)]}) imports {m} ({ORDER[layer_of(m)]})"
              for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"
              for m in sorted(imports(p)) if layer_of(m) > layer_of(p.stem)]
    assert upward == []


def test_the_import_graph_has_no_circle() -> None:
    graph = {p.stem: imports(p) - {p.stem} for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
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
