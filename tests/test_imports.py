"""The import graph of ``src/mosaicseg`` and ``benchmarks``: no cycles, and the stage order of the design.

Static part: every module is parsed with :mod:`ast`; every import counts, at module level or inside a function
(a deferred import is still a dependency, and the circle it closes bites the first caller who imports the other
side first). ``from X import Y`` is an edge to ``X.Y`` where that is a module, else to ``X``; importing ``a.b.c``
from outside package ``a.b`` also runs ``a.b/__init__`` (an edge to the package); ``__import__("m")`` and
``importlib.import_module("m")`` with a literal name count too. Imports under ``if TYPE_CHECKING:`` never run: they
count for the stage order (a type from a later stage is a dependency on it) but not for cycles.

Stage order (ARCHITECTURE.md): data → models → training → inference → evaluation → cli/demo. A module may import
its own or an earlier stage. Shared plumbing is importable from anywhere and itself imports only plumbing (and,
for ``data/workdir.py``, the data stage it lives in). An ``__init__`` that imports nothing is importable from
anywhere. Three leaf modules of later stages may be used by the training loop's validation; what importing them
runs (their imports, and their packages' ``__init__``) must then stay before training.

Dynamic part: each module is imported first, with no module of ours loaded before it (a forked child of a fresh
interpreter that has imported only third-party modules), so a cycle shows whatever the import order.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mosaicseg": ROOT / "src" / "mosaicseg", "benchmarks": ROOT / "benchmarks"}

STAGES = ("data", "models", "training", "inference", "evaluation", "cli")
# top-level modules of the last stage (the command line and the demo it runs)
LAST_STAGE = {"mosaicseg.cli", "mosaicseg.demo", "mosaicseg.fewshot"}
SHARED = {
    "mosaicseg",
    "mosaicseg.types",
    "mosaicseg.config",
    "mosaicseg.registry",
    "mosaicseg.atomic",
    "mosaicseg.errors",
    "mosaicseg.runtime",
    "mosaicseg.progress",
    "mosaicseg.data.workdir",
}
# leaf modules of a later stage → the stages that may import them (the training loop's validation)
EARLY_LEAVES = {
    "mosaicseg.inference.sliding_window": {"training"},
    "mosaicseg.evaluation.metrics": {"training"},
    # the final validation scores each task with its largest component kept: the post-processing decision
    "mosaicseg.inference.postprocess": {"training"},
}


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``target`` at ``line``; ``via`` is the module named in the import when ``target`` is
    a package whose ``__init__`` that import runs; ``type_only``: under ``if TYPE_CHECKING:``."""

    importer: str
    target: str
    line: int
    via: str | None = None
    type_only: bool = False

    def describe(self, files: dict[str, Path]) -> str:
        where = f"{_shown(files[self.importer])}:{self.line}"
        how = f" (package __init__ run by importing {self.via})" if self.via else ""
        return f"{self.importer} → {self.target}{how} [{where}]"


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def discover(packages: dict[str, Path]) -> dict[str, Path]:
    """Module name → file of every module of ``packages`` (name → folder; a package is its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects ``(name, line, type_only)`` of every import in a module, resolved to full dotted names:
    ``from X import Y`` gives ``X.Y`` (kept only where that is a module, else ``X``; see :func:`graph`)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[list[str], int, bool]] = []  # candidates (most specific first), line, type_only
        self._type_only = 0

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._type_only += 1
            for child in node.body:
                self.visit(child)
            self._type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(([alias.name], node.lineno, self._type_only > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parent = ".".join(parts[: len(parts) - (node.level - 1)])
            base = f"{parent}.{base}" if base else parent
        for alias in node.names:
            names = [base] if alias.name == "*" else [f"{base}.{alias.name}", base]
            self.found.append((names, node.lineno, self._type_only > 0))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in ("__import__", "import_module") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self.found.append(([arg.value], node.lineno, self._type_only > 0))
        self.generic_visit(node)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def build_graph(packages: dict[str, Path]) -> tuple[dict[str, Path], dict[str, list[Edge]], list[str]]:
    """Modules, their outgoing edges, and imports of ``packages`` that resolve to no module (descriptions)."""
    files = discover(packages)
    edges: dict[str, list[Edge]] = {m: [] for m in files}
    unresolved: list[str] = []
    for module, path in files.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for candidates, line, type_only in visitor.found:
            target = next((c for c in candidates if c in files), None)
            if target is None:
                if candidates[-1].split(".")[0] in packages:
                    unresolved.append(f"{_shown(path)}:{line}: {candidates[-1]}")
                continue
            if target != module:
                edges[module].append(Edge(module, target, line, type_only=type_only))
            # packages of the target that the importer is not inside get their __init__ run
            own = {*_ancestors(module), module}
            for pkg in _ancestors(target):
                if pkg not in own and pkg in files:
                    edges[module].append(Edge(module, pkg, line, via=target, type_only=type_only))
    return files, edges, unresolved


@cache
def graph() -> tuple[dict[str, Path], dict[str, list[Edge]], list[str]]:
    """:func:`build_graph` of ``src/mosaicseg`` and ``benchmarks``."""
    return build_graph(PACKAGES)


def cycles_of(files: dict[str, Path], edges: dict[str, list[Edge]]) -> list[str]:
    """Every import cycle (strongly connected component of the run-time edges), each with one shortest cycle."""
    succ = {m: [e.target for e in es if not e.type_only] for m, es in edges.items()}
    out = []
    for component in strongly_connected(sorted(files), succ):
        path = _shortest_cycle(component[0], set(component), edges)
        out.append(
            f"cycle among {{{', '.join(component)}}}, e.g.:\n      " + "\n      ".join(e.describe(files) for e in path)
        )
    return out


def strongly_connected(nodes: Iterable[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; singletons only with a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in succ.get(node, ()):
                    out.append(sorted(component))
    return out


def _shortest_cycle(start: str, members: set[str], edges: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through ``start`` inside one component, as its edges (breadth-first)."""
    previous: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for e in edges[node]:
                if e.type_only or e.target not in members:
                    continue
                if e.target == start:
                    path = [e]
                    while path[0].importer != start:
                        path.insert(0, previous[path[0].importer])
                    return path
                if e.target not in previous:
                    previous[e.target] = e
                    following.append(e.target)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def test_the_parser_on_made_up_modules(tmp_path: Path) -> None:
    """Every kind of import becomes the right edge (else the checks below would pass vacuously)."""
    sources = {
        "__init__": "",
        "a": (
            "import os\n"
            "from typing import TYPE_CHECKING\n"
            "import pkg.b\n"  # 3: module level
            "from pkg import c\n"  # 4: a submodule named in from-import
            "from pkg.sub.d import thing\n"  # 5: a name of a module, in another package: its __init__ runs
            "if TYPE_CHECKING:\n"
            "    from pkg.e import E\n"  # 7: type only
            "def f():\n"
            "    from pkg.nothere import x\n"  # 9: no such module
            "    return __import__('pkg.q'), importlib.import_module('pkg.r')\n"  # 10: literal names
        ),
        "b": "", "c": "", "e": "", "q": "", "r": "",
        "sub/__init__": "",
        "sub/d": "from . import e2\nfrom ..b import B\nfrom .e2 import *\n",  # relative imports
        "sub/e2": "",
    }  # fmt: skip
    for name, text in sources.items():
        path = tmp_path / "pkg" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    files, edges, unresolved = build_graph({"pkg": tmp_path / "pkg"})
    assert set(files) == {
        "pkg",
        "pkg.a",
        "pkg.b",
        "pkg.c",
        "pkg.e",
        "pkg.q",
        "pkg.r",
        "pkg.sub",
        "pkg.sub.d",
        "pkg.sub.e2",
    }
    got = {(e.target, e.line, e.via, e.type_only) for e in edges["pkg.a"]}
    assert got == {
        ("pkg.b", 3, None, False),
        ("pkg.c", 4, None, False),
        ("pkg.sub.d", 5, None, False),
        ("pkg.sub", 5, "pkg.sub.d", False),
        ("pkg.e", 7, None, True),
        ("pkg.q", 10, None, False),
        ("pkg.r", 10, None, False),
    }
    # inside its own package a module runs no __init__ of it; "from . import e2" names the submodule
    assert {(e.target, e.line) for e in edges["pkg.sub.d"]} == {("pkg.sub.e2", 1), ("pkg.b", 2), ("pkg.sub.e2", 3)}
    assert [u.split(": ")[-1] for u in unresolved] == ["pkg.nothere"]
    succ = {"a": ["b"], "b": ["c", "a"], "c": ["c"], "d": ["a"]}
    assert sorted(strongly_connected(succ, succ)) == [["a", "b"], ["c"]]
    # and the real tree is found
    assert {"mosaicseg.cli", "mosaicseg.data.io", "mosaicseg.training.loop", "benchmarks.nnunet"} <= set(graph()[0])


def test_every_import_of_our_packages_resolves_to_a_module() -> None:
    _, _, unresolved = graph()
    assert not unresolved, "imports of modules that do not exist:\n  " + "\n  ".join(unresolved)


def test_no_import_cycles() -> None:
    cycles = cycles_of(*graph()[:2])
    assert not cycles, f"{len(cycles)} import cycle(s):\n  " + "\n  ".join(cycles)


def stage_of(module: str) -> int:
    """The stage a module lives in: index into :data:`STAGES`; -1 for top-level shared plumbing."""
    parts = module.split(".")
    if module in LAST_STAGE:
        return STAGES.index("cli")
    if len(parts) > 1 and parts[1] in STAGES[:-1]:
        return STAGES.index(parts[1])
    if module in SHARED:
        return -1
    raise KeyError(module)


def _rank_as_target(module: str, edges: dict[str, list[Edge]]) -> int:
    """How late a stage importing ``module`` depends on: shared plumbing and empty ``__init__`` files: none."""
    if module in SHARED:
        return -1
    if not edges[module] and module.count(".") == 1 and module.split(".")[1] in STAGES:
        return -1  # an __init__ that imports nothing runs nothing
    return stage_of(module)


def test_every_module_has_a_place_in_the_stage_order() -> None:
    files, _, _ = graph()
    unplaced = []
    for m in sorted(files):
        if m.startswith("mosaicseg"):
            try:
                stage_of(m)
            except KeyError:
                unplaced.append(m)
    assert not unplaced, (
        f"modules in no stage: {unplaced}. Fix: move them into a stage folder, or list them as shared plumbing in "
        "tests/test_imports.py (and ARCHITECTURE.md)"
    )


def _ours(module: str) -> bool:
    return module.split(".")[0] == "mosaicseg"


def stage_violations(files: dict[str, Path], edges: dict[str, list[Edge]]) -> list[str]:
    """Every edge of ``mosaicseg`` that points to a later stage (allowed: :data:`EARLY_LEAVES`)."""
    name = {-1: "shared plumbing", **dict(enumerate(STAGES))}
    out = []
    for module in sorted(filter(_ours, files)):
        own = stage_of(module)
        for e in edges[module]:
            if not _ours(e.target):
                continue
            target = _rank_as_target(e.target, edges)
            if target <= own or (own >= 0 and STAGES[own] in EARLY_LEAVES.get(e.target, ())):
                continue
            out.append(f"{name[own]} → {name[target]}: {e.describe(files)}")
    return out


def test_imports_follow_the_stage_order() -> None:
    violations = stage_violations(*graph()[:2])
    assert not violations, (
        f"{len(violations)} import(s) against the stage order {' → '.join(STAGES)} (a module may import only "
        "its own or an earlier stage; shared plumbing only plumbing):\n  " + "\n  ".join(violations)
    )


def _runs_when_imported(module: str, edges: dict[str, list[Edge]]) -> dict[str, list[Edge]]:
    """Every module that importing ``module`` from another stage runs (its packages' ``__init__`` included),
    with the chain of edges that reaches it."""
    chains: dict[str, list[Edge]] = {module: []}
    for pkg in _ancestors(module):
        if pkg in edges:
            chains[pkg] = [Edge(module, pkg, 0, via=module)]
    frontier = list(chains)
    while frontier:
        node = frontier.pop()
        for e in edges[node]:
            if not e.type_only and e.target not in chains:
                chains[e.target] = [*chains[node], e]
                frontier.append(e.target)
    return chains


def late_modules_run_by(leaf: str, files: dict[str, Path], edges: dict[str, list[Edge]]) -> list[str]:
    """The modules of the stages allowed to import ``leaf`` or later that importing it runs, with how (the
    other leaves are checked on their own)."""
    chains = _runs_when_imported(leaf, edges)
    limit = min(STAGES.index(s) for s in EARLY_LEAVES[leaf])
    bad = [m for m in sorted(chains) if m not in EARLY_LEAVES and _rank_as_target(m, edges) >= limit]
    return [
        f"{m}: " + " ; ".join(e.describe(files) if e.line else f"{e.target} (package of {leaf})" for e in chains[m])
        for m in bad
    ]


@pytest.mark.parametrize("leaf", sorted(EARLY_LEAVES))
def test_leaves_used_before_their_stage_run_only_earlier_stages(leaf: str) -> None:
    files, edges, _ = graph()
    assert leaf in files
    late = late_modules_run_by(leaf, files, edges)
    assert not late, (
        f"importing {leaf} (allowed in stage {sorted(EARLY_LEAVES[leaf])}) also runs these modules of that stage "
        "or later:\n  " + "\n  ".join(late)
    )


def test_made_up_stage_violations_are_all_reported(tmp_path: Path) -> None:
    """The stage checks can fail, and report every violation at once."""
    sources = {
        "__init__": "",
        "errors": "from mosaicseg.training.loop import L\n",  # plumbing → training
        "cli": "import mosaicseg.evaluation.report\n",
        "data/__init__": "",
        "data/io": "def f():\n    from mosaicseg.inference.predictor import P\n",  # data → inference, deferred
        "data/workdir": "from mosaicseg.data.io import f\n",  # plumbing in the data stage may use data
        "training/__init__": "",
        "training/loop": "from mosaicseg.inference.sliding_window import S\nfrom mosaicseg.evaluation import metrics\n",
        "inference/__init__": "",
        "inference/sliding_window": "from mosaicseg.data.io import f\n",
        "inference/predictor": "from mosaicseg.training.loop import L\nfrom mosaicseg import runtime\n",
        "runtime": "from mosaicseg.data import workdir\n",
        "evaluation/__init__": "from mosaicseg.evaluation.report import R\n",  # not empty: importing metrics runs it
        "evaluation/metrics": "",
        "evaluation/report": "from mosaicseg.cli import C\n",  # evaluation → cli
    }
    for name, text in sources.items():
        path = tmp_path / "mosaicseg" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    files, edges, unresolved = build_graph({"mosaicseg": tmp_path / "mosaicseg"})
    assert not unresolved
    found = [v.split(" [")[0] for v in stage_violations(files, edges)]
    assert found == [
        "data → inference: mosaicseg.data.io → mosaicseg.inference.predictor",
        "shared plumbing → training: mosaicseg.errors → mosaicseg.training.loop",
        "evaluation → cli: mosaicseg.evaluation.report → mosaicseg.cli",
        "training → evaluation: mosaicseg.training.loop → mosaicseg.evaluation "
        "(package __init__ run by importing mosaicseg.evaluation.metrics)",
    ]
    late = late_modules_run_by("mosaicseg.evaluation.metrics", files, edges)
    assert [v.split(":")[0] for v in late] == ["mosaicseg.cli", "mosaicseg.evaluation", "mosaicseg.evaluation.report"]
    # data/io.py's deferred import of the predictor reaches the training loop and all it imports
    late = late_modules_run_by("mosaicseg.inference.sliding_window", files, edges)
    assert [v.split(":")[0] for v in late] == [
        "mosaicseg.cli",
        "mosaicseg.evaluation",
        "mosaicseg.evaluation.report",
        "mosaicseg.inference.predictor",
        "mosaicseg.training.loop",
    ]
    assert "mosaicseg.data.io → mosaicseg.inference.predictor" in late[3]


# --------------------------------------------------------------------------------------------- dynamic
# One fresh interpreter per module costs a second or two each, mostly importing torch (63 s for 49 modules on 2
# cores). So one fresh interpreter first imports the third-party modules that ours import at module level, checks
# that none of ours is loaded, and then forks one child per module, which imports it first: the same check (no
# module of ours is loaded before it), at a fraction of the time. Without os.fork: one interpreter per module.
_FORKING_PROBE = """
import importlib, json, os, sys, time, traceback
ours, externals, modules = json.loads(sys.argv[1])
for name in externals:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # a missing optional dependency: the module that needs it reports it below
early = sorted(m for m in sys.modules if m.split(".")[0] in ours)
assert not early, f"third-party imports loaded modules of ours: {early}"
results = {}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        t = time.perf_counter()
        try:
            importlib.import_module(module)
            out = {"ok": True, "seconds": time.perf_counter() - t,
                   "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ours)}
        except BaseException:
            out = {"ok": False, "error": traceback.format_exc()}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    results[module] = json.loads(data) if data else {"ok": False, "error": f"the child died (status {status})"}
print(json.dumps(results))
"""

_PROBE = """
import importlib, json, sys, time, traceback
ours, module = json.loads(sys.argv[1])
t = time.perf_counter()
try:
    importlib.import_module(module)
    out = {"ok": True, "seconds": time.perf_counter() - t,
           "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ours)}
except BaseException:
    out = {"ok": False, "error": traceback.format_exc()}
print(json.dumps(out))
"""


def _python(script: str, argument: object, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argument)],
        cwd=cwd,  # benchmarks is importable from the repository root
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _module_level_externals(files: dict[str, Path], ours: list[str]) -> list[str]:
    """Top-level names of the third-party modules our modules import at module level (outside functions)."""
    names = set()
    for path in files.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names - set(ours) if n != "__future__")


def import_each_first(
    files: dict[str, Path], ours: list[str], cwd: Path = ROOT, fork: bool = hasattr(os, "fork")
) -> dict[str, dict]:
    """``{module: {"ok", "seconds", "loaded"} or {"ok": False, "error"}}``, each module imported first, with the
    packages ``ours`` importable from ``cwd``."""
    modules = sorted(files)
    if fork:
        return json.loads(_python(_FORKING_PROBE, [ours, _module_level_externals(files, ours), modules], cwd))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        outputs = pool.map(lambda m: _python(_PROBE, [ours, m], cwd), modules)
    return {m: json.loads(out) for m, out in zip(modules, outputs, strict=True)}


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """What each module loads must also be what the static graph says importing it runs (the graph misses
    nothing that runs), and the leaves' rule must hold at run time too."""
    files, edges, _ = graph()
    t0 = time.perf_counter()
    results = import_each_first(files, sorted(PACKAGES))
    wall = time.perf_counter() - t0
    failures, unexplained = [], []
    for module, result in sorted(results.items()):
        if not result["ok"]:
            failures.append(f"import {module} fails when it is the first module of ours imported:\n"
                            f"{result['error'].strip()[-1500:]}")  # fmt: skip
            continue
        loaded = set(result["loaded"])
        missing = sorted(loaded - set(_runs_when_imported(module, edges)) - set(PACKAGES))
        if missing:
            unexplained.append(f"{module} loads {missing}, which the static graph does not reach")
        if module in EARLY_LEAVES:
            limit = min(STAGES.index(s) for s in EARLY_LEAVES[module])
            late = sorted(
                m for m in loaded if m not in EARLY_LEAVES and m in files and _rank_as_target(m, edges) >= limit
            )
            if late:
                failures.append(f"import {module} loads {late}, of the stage that may import it or later")
    print(f"{len(files)} modules imported first: {wall:.1f} s")
    assert not failures, f"{len(failures)} problem(s):\n" + "\n\n".join(failures)
    assert not unexplained, "\n".join(unexplained)


def test_made_up_cycles_are_found_statically_and_at_run_time(tmp_path: Path) -> None:
    """The checks above can fail. A package with three circles: ``a`` ↔ ``b`` at module level (fails only when
    ``b`` is imported first), ``e`` ↔ ``f`` through an import inside a function (never fails at import time; the
    static check still finds it), and ``__init__`` → ``c`` → the package."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    sources = {
        "__init__": "from cyclepkg.c import C\n",
        "a": "from cyclepkg.b import B\n\nA = 1\n",
        "b": "import cyclepkg.a\n\nB = 2\n",
        "c": "import cyclepkg\n\nC = 3\n",
        "e": "from cyclepkg.f import get_e\n\nE = 5\n",
        "f": "def get_e():\n    from cyclepkg.e import E\n\n    return E\n",
    }
    for name, text in sources.items():
        (pkg / f"{name}.py").write_text(text)
    files, edges, unresolved = build_graph({"cyclepkg": pkg})
    assert not unresolved
    cycles = {c.split("}")[0] + "}": c for c in cycles_of(files, edges)}
    assert sorted(cycles) == [
        "cycle among {cyclepkg, cyclepkg.c}",
        "cycle among {cyclepkg.a, cyclepkg.b}",
        "cycle among {cyclepkg.e, cyclepkg.f}",
    ]
    assert "__init__.py:1" in cycles["cycle among {cyclepkg, cyclepkg.c}"]
    assert "b.py:1" in cycles["cycle among {cyclepkg.a, cyclepkg.b}"]
    assert "f.py:2" in cycles["cycle among {cyclepkg.e, cyclepkg.f}"]
    for fork in {hasattr(os, "fork"), False}:
        results = import_each_first(files, ["cyclepkg"], cwd=tmp_path, fork=fork)
        assert not results["cyclepkg.b"]["ok"] and "partially initialized" in results["cyclepkg.b"]["error"]
        assert all(r["ok"] for m, r in results.items() if m != "cyclepkg.b"), results
        assert set(results["cyclepkg.a"]["loaded"]) == {"cyclepkg", "cyclepkg.a", "cyclepkg.b", "cyclepkg.c"}
