"""The layering of ``cosytrain/`` that ``docs/architecture.md`` states, checked on the code's own imports.

The table of rooms is read from the doc itself, so the doc and this test cannot drift apart. Every
``import`` in ``cosytrain/`` (module level or inside a function) is resolved with ``ast``; an import
the table does not allow, an import cycle, a module in no room or a lazy ``"module:attr"`` target
(the model-directory registry, the CLI's commands) outside its room's reach fails with a message
naming the module, the line and the import. The checker is also run on small made-up packages, so
that it is shown to fail where it must.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "cosytrain"
DOC = REPO_ROOT / "docs" / "architecture.md"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Room:
    rank: int
    name: str
    modules: tuple[str, ...]
    may_import: frozenset[str]


def read_rooms(doc: str) -> dict[str, Room]:
    """The rows between the ``architecture-table`` markers of docs/architecture.md."""
    match = re.search(r"<!-- architecture-table.*?-->(.*?)<!-- /architecture-table -->", doc, re.S)
    assert match, f"{DOC}: no <!-- architecture-table --> ... <!-- /architecture-table --> block"
    rooms: dict[str, Room] = {}
    for line in match.group(1).strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue  # header and separator rows
        rank, name, modules, allowed = cells
        rooms[name] = Room(int(rank), name, tuple(re.findall(r"`([\w.]+)`", modules)),
                           frozenset() if allowed == "nothing" else frozenset(a.strip() for a in allowed.split(",")))
    return rooms


def room_of(module: str, rooms: dict[str, Room]) -> str | None:
    """The room whose module prefix is the longest match for ``module`` (the top-level package
    ``cosytrain`` itself matches only its ``__init__``, so a new top-level module must be placed)."""
    best, length = None, -1
    for room in rooms.values():
        for prefix in room.modules:
            inside = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or inside) and len(prefix) > length:
                best, length = room.name, len(prefix)
    return best


# --------------------------------------------------------------------------------------------------
# The imports
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a package means its __init__)
    path: str  # file, for the message
    line: int
    text: str  # the statement as written


def module_names(root: Path) -> dict[str, Path]:
    """``cosytrain.x.y`` -> file, packages by their ``__init__.py``."""
    names = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


def _nearest(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(modules: dict[str, Path], top: str = "cosytrain") -> list[Import]:
    """Every import of a module of ``top`` by a module of ``top``, resolved to the module it loads."""
    found = []
    home = modules[top].parent.parent  # messages name files as cosytrain/...
    for source, file in modules.items():
        is_package = file.name == "__init__.py"
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = source.split(".") if is_package else source.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == top or target.startswith(top + "."):
                    resolved = _nearest(target, modules)
                    if resolved is not None and resolved != source:
                        found.append(Import(source, resolved, str(file.relative_to(home)), node.lineno,
                                            ast.unparse(node)))
    return found


def layer_violations(imports: list[Import], rooms: dict[str, Room]) -> list[str]:
    problems = []
    for imp in imports:
        src, dst = room_of(imp.source, rooms), room_of(imp.target, rooms)
        if src is None or dst is None or src == dst:
            continue
        if dst not in rooms[src].may_import:
            allowed = ", ".join(sorted(rooms[src].may_import)) or "nothing"
            problems.append(f"{imp.path}:{imp.line}: {imp.source} ({src}) imports {imp.target} ({dst}):"
                            f" `{imp.text}`; {src} may import {allowed} (docs/architecture.md)")
    return problems


def import_cycles(imports: list[Import]) -> list[str]:
    """One message per strongly connected set of modules, naming each import on one of its cycles."""
    graph: dict[str, list[Import]] = {}
    for imp in imports:
        graph.setdefault(imp.source, []).append(imp)
        graph.setdefault(imp.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    messages = []
    for component in components:
        start = min(component)
        cycle, seen, node = [], set(), start
        while node not in seen:  # walk edges inside the component until a module repeats
            seen.add(node)
            edge = min((e for e in graph[node] if e.target in component), key=lambda e: e.target)
            cycle.append(edge)
            node = edge.target
        cycle = cycle[[e.source for e in cycle].index(node):]
        steps = "; ".join(f"{e.path}:{e.line} {e.source} -> {e.target} (`{e.text}`)" for e in cycle)
        messages.append(f"import cycle {' -> '.join([e.source for e in cycle] + [node])}: {steps}")
    return messages


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------

ROOMS = read_rooms(DOC.read_text(encoding="utf-8"))
MODULES = module_names(PACKAGE)
IMPORTS = imports_of(MODULES)


def test_the_table_is_layered() -> None:
    assert {"base", "data", "models", "modeldir", "tasks", "export", "inference", "cli"} <= set(ROOMS)
    for room in ROOMS.values():
        unknown = room.may_import - set(ROOMS)
        assert not unknown, f"docs/architecture.md: {room.name} may import unknown rooms {sorted(unknown)}"
        upward = [r for r in room.may_import if ROOMS[r].rank >= room.rank]
        assert not upward, (f"docs/architecture.md: {room.name} (rank {room.rank}) may import {upward}, which are"
                            " not below it; a room imports only lower ranks")


def test_every_module_belongs_to_a_room() -> None:
    homeless = [m for m in MODULES if room_of(m, ROOMS) is None]
    assert not homeless, f"modules in no room of docs/architecture.md: {homeless}; add them to the table"


def test_no_import_reaches_a_room_it_may_not() -> None:
    assert len(IMPORTS) > 100  # the walk found the package's imports
    problems = layer_violations(IMPORTS, ROOMS)
    assert not problems, "\n".join(problems)


def test_no_import_cycle() -> None:
    cycles = import_cycles(IMPORTS)
    assert not cycles, "\n".join(cycles)


def test_models_import_no_lightning() -> None:
    """``models/`` is pure PyTorch: no Lightning, and nothing that reads files or configs of ours."""
    problems = []
    for name, file in MODULES.items():
        if room_of(name, ROOMS) != "models":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names):
                    problems.append(f"{file.relative_to(REPO_ROOT)}:{node.lineno}: `{ast.unparse(node)}`")
    assert not problems, "models/ must stay pure PyTorch: " + "; ".join(problems)


MAX_LINES = 450
REASON = "Why one module over 450 lines:"


def test_long_modules_say_why() -> None:
    """Small modules with one job; a module over 450 lines says at the top why it stays whole."""
    long = []
    for name, file in MODULES.items():
        text = file.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_LINES and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{file.relative_to(REPO_ROOT)} ({lines} lines)")
    assert not long, f"split these modules or start a paragraph of their docstring with {REASON!r}: {long}"


def _lazy_targets() -> list[tuple[str, str, str]]:
    """(room of the holder, what holds it, "module:attr") for the lazy import strings."""
    from cosytrain import cli
    from cosytrain.modeldir import registry

    out = [("modeldir", f"modeldir.registry[{k!r}]", v) for table in (registry.CLASSES, registry.FUNCTIONS)
           for k, v in table.items()]
    out += [("cli", f"cli.COMMANDS[{k!r}]", target) for k, (target, _) in cli.COMMANDS.items()]
    return out


@pytest.mark.parametrize("holder_room, holder, target", _lazy_targets())
def test_lazy_import_strings_stay_in_reach(holder_room: str, holder: str, target: str) -> None:
    module, _, attr = target.partition(":")
    assert module in MODULES, f"{holder} = {target!r}: no module {module} in cosytrain/"
    room = room_of(module, ROOMS)
    assert room in ROOMS[holder_room].may_import, (
        f"{holder} = {target!r} reaches {room}, which {holder_room} may not import (docs/architecture.md)")
    assert re.search(rf"^(class|def) {re.escape(attr)}\b", MODULES[module].read_text(encoding="utf-8"), re.M), \
        f"{holder} = {target!r}: {module} defines no {attr}"


# --------------------------------------------------------------------------------------------------
# The checker fails where it must (a made-up package)
# --------------------------------------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / "cosytrain" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_names(tmp_path / "cosytrain")


def test_checker_names_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    modules = _package(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/net.py": "def f():\n    from cosytrain.tasks.train import Task\n",
        "tasks/__init__.py": "",
        "tasks/train.py": "from .loop import run\nclass Task: ...\n",
        "tasks/loop.py": "import cosytrain.tasks.train\ndef run(): ...\n",
    })
    imports = imports_of(modules)
    violations = layer_violations(imports, ROOMS)
    assert violations == ["cosytrain/models/net.py:2: cosytrain.models.net (models) imports cosytrain.tasks.train (tasks):"
                          " `from cosytrain.tasks.train import Task`; models may import base, data"
                          " (docs/architecture.md)"]
    cycles = import_cycles(imports)
    assert len(cycles) == 1
    assert cycles[0].startswith("import cycle cosytrain.tasks.loop -> cosytrain.tasks.train -> cosytrain.tasks.loop")
    assert "cosytrain/tasks/train.py:1 cosytrain.tasks.train -> cosytrain.tasks.loop (`from .loop import run`)" in cycles[0]
    assert "cosytrain/tasks/loop.py:1 cosytrain.tasks.loop -> cosytrain.tasks.train (`import cosytrain.tasks.train`)" in cycles[0]


def test_a_module_outside_the_table_has_no_room() -> None:
    assert room_of("cosytrain.newroom.thing", ROOMS) is None and room_of("cosytrain.stray", ROOMS) is None
    assert room_of("cosytrain", ROOMS) == "base" and room_of("cosytrain.modeldir.weights", ROOMS) == "modeldir"


def test_a_submodule_importing_its_own_package_init_is_a_cycle(tmp_path: Path) -> None:
    """The rule modeldir/ follows: its modules import siblings, never the package that re-exports them."""
    modules = _package(tmp_path, {
        "__init__.py": "",
        "modeldir/__init__.py": "from cosytrain.modeldir.weights import load\n",
        "modeldir/weights.py": "from cosytrain.modeldir import PARTS\ndef load(): ...\n",
    })
    cycles = import_cycles(imports_of(modules))
    assert len(cycles) == 1 and "cosytrain.modeldir.weights -> cosytrain.modeldir" in cycles[0]
