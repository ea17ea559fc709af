"""The layout docs/daemon.md draws holds in the code: no import cycle among the modules of ``daemon/`` and
``model/`` (imports inside functions count: they run too, only later), no module over 400 lines, and ``model/``
pure: nothing from ``daemon/``, no files, sockets or databases. Parsed with ``ast``, nothing is imported.

The checker is tried on a small package made here with a known cycle, a long module and an impure model, so a
checker that parses nothing cannot pass."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "model")
MAX_LINES = 400
# model/ is the science: what would reach a file, a socket, a database, another process or the daemon
IMPURE_IMPORTS = frozenset(
    {"daemon", "socket", "sqlite3", "zmq", "nats", "urllib", "http", "subprocess", "shutil", "tempfile", "pathlib"}
)
IMPURE_CALLS = frozenset(
    {"open", "read_text", "write_text", "read_bytes", "write_bytes", "savez", "savez_compressed", "savetxt", "loadtxt"}
    | {"tofile", "fromfile", "save_file", "load_file"}
)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under ``root/<package>`` (a package is its ``__init__``)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` names, with a relative one (``from . import x``) resolved against ``name``."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of ``mods`` that ``path`` imports, anywhere in it (top level, functions, ``if`` blocks).
    ``from a import b`` is an edge to ``a.b`` where that is a module, else to ``a`` (b is a name defined in a)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, path, node)
            for a in node.names:
                if f"{base}.{a.name}" in mods:
                    out.add(f"{base}.{a.name}")
                elif base in mods:
                    out.add(base)
    return out - {name}


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module → the modules of ``packages`` it imports."""
    mods = modules(root, packages)
    return {name: imported(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def long_modules(root: Path, packages: tuple[str, ...] = PACKAGES, limit: int = MAX_LINES) -> dict[str, int]:
    """Files over ``limit`` lines → their line count."""
    lengths = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in modules(root, packages).values()}
    return {p: n for p, n in lengths.items() if n > limit}


def impurities(root: Path, package: str = "model") -> list[str]:
    """What in ``package`` imports the daemon or an I/O module, or calls a file function: ``file:line what``."""
    found = []
    for path in modules(root, (package,)).values():
        where = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level:
                    names = []  # relative: inside the package itself
                found += [f"{where}:{node.lineno} import {n}" for n in names if n.split(".")[0] in IMPURE_IMPORTS]
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if called in IMPURE_CALLS:
                    found.append(f"{where}:{node.lineno} calls {called}()")
    return sorted(found)


def test_no_import_cycle_among_daemon_and_model_modules():
    assert cycles(import_graph(ROOT)) == []


def test_no_module_over_400_lines():
    assert long_modules(ROOT) == {}


def test_model_imports_nothing_from_daemon_and_opens_nothing():
    assert impurities(ROOT) == []


def test_the_graph_holds_the_imports_the_code_makes():
    # known edges of the real tree, so that a checker that reads nothing cannot pass the tests above
    graph = import_graph(ROOT)
    assert {"daemon.serve.service", "daemon.store.db", "daemon.protocol", "model.spectra"} <= graph.keys()
    assert "daemon.store.db" in graph["daemon.serve.service"]
    assert "daemon.protocol" in graph["daemon.serve.ingest"]
    assert "daemon.cli.app" in graph["daemon.cli.station"]
    assert not any(m.startswith("daemon") for model in graph if model.startswith("model.") for m in graph[model])


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checker_finds_a_known_cycle_a_long_module_and_an_impure_model(tmp_path):
    write(
        tmp_path,
        {
            "daemon/__init__.py": "",
            "daemon/a.py": "from daemon.sub import b\n",
            "daemon/sub/__init__.py": "",
            "daemon/sub/b.py": "def later():\n    from . import c  # inside a function: still an edge\n",
            "daemon/sub/c.py": "import daemon.a\nfrom ..d import X\n",  # closes a → b → c → a; d is outside it
            "daemon/d.py": "X = 1\n" + "y = 2\n" * 400,  # 401 lines
            "model/__init__.py": "",
            "model/pure.py": "import numpy as np\nfrom model import other\n",
            "model/other.py": "def f(p):\n    import socket\n    return open(p).read()\n",
            "model/bad.py": "from daemon.a import b\nimport sqlite3, zmq.asyncio\n\ndef g(p):\n    p.write_text('x')\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["daemon.a"] == {"daemon.sub.b"} and graph["daemon.sub.b"] == {"daemon.sub.c"}
    assert graph["daemon.sub.c"] == {"daemon.a", "daemon.d"}
    assert cycles(graph) == [["daemon.a", "daemon.sub.b", "daemon.sub.c"]]
    assert long_modules(tmp_path) == {"daemon/d.py": 401}
    assert impurities(tmp_path) == [
        "model/bad.py:1 import daemon.a",
        "model/bad.py:2 import sqlite3",
        "model/bad.py:2 import zmq.asyncio",
        "model/bad.py:5 calls write_text()",
        "model/other.py:2 import socket",
        "model/other.py:3 calls open()",
    ]
    # the cycle broken (c no longer imports a): none left
    (tmp_path / "daemon/sub/c.py").write_text("from ..d import X\n")
    assert cycles(import_graph(tmp_path)) == []
