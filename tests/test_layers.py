"""Imports point one way: each module may import only from its own layer or the layers below it.

A module's layer is the folder it lives in (docs/architecture.md draws them), bottom up:

* ``core``, no I/O: events, the SSE decoder, the chunk interpreters, errors, metric types, tools, settings,
  renderers, what a run knows of a workflow;
* ``upstream``: the model client, a plain completion, agents and workflows, producers, the simulator;
* ``engine``: runs and their logs, subscriptions, the pump from producers to runs, the broker and the cluster;
* ``transport``: connections, outboxes, compression, plain HTTP answers;
* ``handlers``: the application context and one handler module per wire protocol;
* ``wiring``: the route table, the server, systemd, the workers.

Above them, the modules at the top of the package are its public face: the Python API (``__init__``), the
programs (``serve``, the terminal ``client``) and the import paths README documents (``events``, ``producers``,
``frameworks``, ``tools``, ``simulator``). They may import anything; nothing imports them.

A module is named by its dotted path under ``wsagent`` (``engine.cluster.follower``; a package by its name).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import wsagent

ORDER = ["core", "upstream", "engine", "transport", "handlers", "wiring"]
#: The public face: what README documents, at the top of the package, and nothing else.
TOP = {"__init__", "serve", "client", "events", "producers", "frameworks", "tools", "simulator"}
PACKAGE = Path(wsagent.__file__).parent


def name_of(path: Path) -> str:
    """A module's name: its dotted path under ``wsagent`` (a package's ``__init__`` is the package's, but
    ``wsagent``'s own is ``__init__``)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {name_of(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Its folder's place in ORDER; the public face is above every layer."""
    folder = module.split(".")[0]
    return ORDER.index(folder) if folder in ORDER else len(ORDER)


def layer_name(module: str) -> str:
    return (ORDER + ["top"])[layer_of(module)]


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


def test_every_module_lives_in_a_layer_or_is_the_public_face() -> None:
    """``ls wsagent`` shows the layers as folders, and at the top only what README documents."""
    assert {name.split(".")[0] for name in MODULES} - set(ORDER) == TOP


def test_nothing_imports_the_public_face() -> None:
    """The face re-exports the layers; a module of a layer imports the layer's module, never the face."""
    facing = [f"{name} imports {m}" for name, path in MODULES.items() if layer_of(name) < len(ORDER)
              for m in sorted(imports(path)) if layer_of(m) == len(ORDER)]
    assert facing == []


def test_imports_point_down() -> None:
    upward = [f"{name} ({layer_name(name)}) imports {m} ({layer_name(m)})"
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
    code = ("import sys, wsagent.core.sse; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('jwt', 'aiohttp', 'websockets') or m.startswith('wsagent.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['wsagent.core', 'wsagent.core.sse']"


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
