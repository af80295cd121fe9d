"""The project's shape: one import namespace, imports pointing one way, no cycles, a complete wheel.

Layers (docs: DESIGN.md "Imports point one way"), lowest first:
    core         tpo_jax.* (every module and subpackage except cli / train / data / checkpoints)
    data, ckpt   tpo_jax.data, tpo_jax.checkpoints (siblings: neither imports the other)
    train        tpo_jax.train
    cli          tpo_jax.cli (the command-line tools)
A module may import its own layer or a lower one. Only static `import` / `from ... import` statements count
(module level and inside functions); `importlib.import_module` in a package's lazy `__getattr__` does not.
"""

import ast
import importlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]  # {"tpo_jax.train": "train", ...}
TOP_LEVEL_FOLDERS = {"train", "data", "checkpoints"}  # installed as tpo_jax.<name>, never importable as <name>
OTHER_PY_DIRS = ("tests", "benchmarks", "experiments")  # not installed, but must use the tpo_jax.* names too

LAYER_NAMES = ("core", "data", "checkpoints", "train", "cli")
LAYER_RANK = {"core": 0, "data": 1, "checkpoints": 1, "train": 2, "cli": 3}


# ------------------------------------------------------------------------------------------------ discovery

def _source_roots() -> list[tuple[str, Path]]:
    """(package name, folder) for each top entry of package-dir; nested entries live inside their folders."""
    return [(pkg, ROOT / folder) for pkg, folder in sorted(PACKAGE_DIR.items())]


def project_modules() -> dict[str, Path]:
    """{dotted module name: file} for every .py file under the package-dir folders, named as installed."""
    modules = {}
    for pkg, folder in _source_roots():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if "__pycache__" in rel.parts:
                continue
            parts = [pkg, *rel.parts[:-1]] + ([] if rel.stem == "__init__" else [rel.stem])
            modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "tpo_jax" and parts[1] in LAYER_NAMES:
        return parts[1]
    return "core"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------------ import graph

@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # file:line
    written: str  # the name as written in the import statement

    def __str__(self):
        return f"{self.src} -> {self.dst}  ({self.where}: {self.written})"


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """Yield (absolute dotted name, candidate submodule names, lineno, as written) for every import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            written = "." * node.level + (node.module or "")
            subs = tuple(f"{name}.{a.name}" for a in node.names if a.name != "*")
            yield name, subs, node.lineno, written


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific project module that importing `name` executes (None if not a project module)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def import_graph(modules: dict[str, Path]) -> tuple[list[Edge], list[str]]:
    """All static import edges between project modules, and every import of a top-level train/data/checkpoints."""
    edges, toplevel = [], []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, subs, lineno, written in _imported_names(tree, module, _is_package(path)):
            where = f"{_rel(path)}:{lineno}"
            if name.split(".")[0] in TOP_LEVEL_FOLDERS:
                toplevel.append(f"{where}: imports top-level {name!r} (use tpo_jax.{name})")
            targets = {m for m in subs if m in modules}  # `from pkg import submodule`
            if not targets or len(targets) < len(subs):  # some names are attributes of the module itself
                dst = _resolve(name, modules)
                if dst is not None:
                    targets.add(dst)
            for dst in sorted(targets):
                if dst != module:
                    edges.append(Edge(module, dst, where, written))
    return edges, toplevel


def _strongly_connected(nodes, succ) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one module."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(succ.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def cycles(edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each import cycle (strongly connected component) with the edges that form it."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
    nodes = set(succ) | {e.dst for e in edges}
    found = []
    for comp in _strongly_connected(nodes, succ):
        members = set(comp)
        found.append((comp, sorted({e for e in edges if e.src in members and e.dst in members},
                                   key=lambda e: (e.src, e.dst, e.where))))
    return found


def upward(edges: list[Edge]) -> list[Edge]:
    """Edges against the layering: to a higher layer, or between the data and checkpoints siblings."""
    bad = []
    for e in edges:
        a, b = layer(e.src), layer(e.dst)
        if LAYER_RANK[b] > LAYER_RANK[a] or (LAYER_RANK[a] == LAYER_RANK[b] and a != b):
            bad.append(e)
    return bad


def _other_files() -> list[Path]:
    return [p for d in OTHER_PY_DIRS if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))
            if "__pycache__" not in p.parts]


# ------------------------------------------------------------------------------------------------ tests

MODULES = project_modules()


def test_discovery_sees_the_whole_project():
    for name in ("tpo_jax.model", "tpo_jax.cli.convert", "tpo_jax.train.step", "tpo_jax.data.pipeline",
                 "tpo_jax.checkpoints.convert", "tpo_jax.checkpoints.tables"):
        assert name in MODULES, f"{name} not found by the module walk"
    assert all(name.split(".")[0] == "tpo_jax" for name in MODULES)


def test_imports_point_one_way_without_cycles():
    edges, toplevel = import_graph(MODULES)
    for path in _other_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            toplevel += [f"{_rel(path)}:{node.lineno}: imports top-level {n!r} (use tpo_jax.{n})"
                         for n in names if n.split(".")[0] in TOP_LEVEL_FOLDERS]
    problems = []
    for comp, comp_edges in cycles(edges):
        problems.append(f"import cycle between {', '.join(comp)}:\n" + "\n".join(f"    {e}" for e in comp_edges))
    for e in upward(edges):
        problems.append(f"upward import ({layer(e.src)} -> {layer(e.dst)}): {e}")
    problems += toplevel
    assert not problems, (f"{len(problems)} import-structure problem(s) (layers, lowest first: core <- data / "
                          "checkpoints <- train <- cli):\n" + "\n".join(problems))


def test_the_checker_finds_cycles_and_upward_imports():
    e = [Edge("tpo_jax.a", "tpo_jax.b", "x", "x"), Edge("tpo_jax.b", "tpo_jax.c", "x", "x"),
         Edge("tpo_jax.c", "tpo_jax.a", "x", "x"), Edge("tpo_jax.c", "tpo_jax.d", "x", "x")]
    assert [c for c, _ in cycles(e)] == [["tpo_jax.a", "tpo_jax.b", "tpo_jax.c"]]
    bad = [Edge("tpo_jax.model", "tpo_jax.data.video", "x", "x"), Edge("tpo_jax.data.x", "tpo_jax.checkpoints.y",
           "x", "x"), Edge("tpo_jax.train.step", "tpo_jax.cli.train", "x", "x")]
    ok = [Edge("tpo_jax.cli.train", "tpo_jax.train.step", "x", "x"), Edge("tpo_jax.data.x", "tpo_jax.model", "x",
          "x"), Edge("tpo_jax.checkpoints.a", "tpo_jax.checkpoints.b", "x", "x")]
    assert upward(bad + ok) == bad
    # relative imports resolve against the package; `from pkg import submodule` points at the submodule
    mods = {"tpo_jax.checkpoints": ROOT / "checkpoints/__init__.py", "tpo_jax.checkpoints.convert": Path("c.py"),
            "tpo_jax.checkpoints.tables": Path("t/__init__.py")}
    tree = ast.parse("from . import tables\nfrom .tables import x\ndef f():\n    from tpo_jax.checkpoints import y\n")
    got = [(_resolve(n, mods), [s for s in subs if s in mods]) for n, subs, _, _ in
           _imported_names(tree, "tpo_jax.checkpoints.convert", False)]
    assert got == [("tpo_jax.checkpoints", ["tpo_jax.checkpoints.tables"]), ("tpo_jax.checkpoints.tables", []),
                   ("tpo_jax.checkpoints", [])]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith(".__main__")))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_package_is_in_pyproject():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {m for m, path in MODULES.items() if _is_package(path)}
    missing, stale = sorted(on_disk - listed), sorted(listed - on_disk)
    assert not missing, f"packages with an __init__.py that pyproject.toml [tool.setuptools] packages leaves " \
                        f"out of the wheel: {missing}"
    assert not stale, f"pyproject.toml [tool.setuptools] packages lists packages that do not exist: {stale}"
    no_init = sorted({_rel(p.parent) for m, p in MODULES.items() if not (p.parent / "__init__.py").exists()})
    assert not no_init, f"folders with .py files but no __init__.py (left out of the wheel): {no_init}"


def _build_wheel(src: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run(cmd + ["--no-build-isolation"], capture_output=True, text=True, env=env)
    if run.returncode != 0:  # e.g. setuptools missing from this environment: let pip fetch it
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, f"pip wheel failed:\n{run.stdout}\n{run.stderr}"
    (wheel,) = out.glob("*.whl")
    return wheel


def test_wheel_installs_one_namespace(tmp_path):
    # build from a clean copy: an in-tree build/ folder can carry stale files into the wheel
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for folder in sorted({f.split("/")[0] for f in PACKAGE_DIR.values()}):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheel = _build_wheel(src, tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tpo_jax"}, \
        f"the wheel installs more than tpo_jax/: {sorted(top)}"
    for required in ("tpo_jax/train/step.py", "tpo_jax/data/pipeline.py", "tpo_jax/checkpoints/convert.py",
                     "tpo_jax/cli/convert.py"):
        assert required in names, f"{required} missing from the wheel"
    assets = sorted(p.name for p in (ROOT / "tpo_jax/assets/videochat_tpo").iterdir() if p.is_file())
    assert assets and all(f"tpo_jax/assets/videochat_tpo/{a}" in names for a in assets), \
        f"assets missing from the wheel: {[a for a in assets if f'tpo_jax/assets/videochat_tpo/{a}' not in names]}"
    # every project module ships (a module outside the listed packages would be silently dropped)
    expected = {m.replace(".", "/") + ("/__init__.py" if _is_package(p) else ".py") for m, p in MODULES.items()}
    assert not sorted(expected - set(names)), f"modules missing from the wheel: {sorted(expected - set(names))}"
