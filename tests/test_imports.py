"""No import cycles in collective/ and topologies/: the import graph read from the source (function-level imports
included) is acyclic, topologies/ imports nothing from the runtime, and every module imports on its own in a fresh
interpreter."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("collective", "topologies")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of PACKAGES (a package is its __init__.py)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if pkg != "collective":
                parts.insert(0, "collective")  # installed (and imported) as a subpackage of collective
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its file (top level, functions, methods).

    ``from pkg import x`` counts as an import of ``pkg.x`` when that is a module, else of ``pkg`` itself. A
    submodule's import does not count as an import of its parent packages: Python has begun running a package's
    __init__ before any of its submodules, so only a direct import of the package can close a cycle through it.
    """
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a closed path (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_graph_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The reader itself: a cycle closed only by an import inside a function is found, and named."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\nfrom pkg import b\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {m: _imports(m, (pkg / "__init__.py") if m == "pkg" else pkg / f"{m.split('.')[1]}.py", known)
             for m in known}
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a", "pkg.b"}
    assert _cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    (pkg / "b.py").write_text("def thing():\n    return 1\n")
    graph["pkg.b"] = _imports("pkg.b", pkg / "b.py", known)
    assert _cycle(graph) is None


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 20, sorted(graph)  # the walk found the packages
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_topologies_imports_nothing_from_the_runtime() -> None:
    for name, deps in _graph().items():
        if name.startswith("collective.topologies"):
            assert all(d.startswith("collective.topologies") for d in deps), (name, sorted(deps))


@pytest.mark.parametrize("first", ["collective.emulate", "collective.topologies.cluster"])
def test_every_module_imports_in_a_fresh_interpreter(first: str) -> None:
    """Each former cycle's member imported first, then every other module, in a new interpreter."""
    names = [first] + [m for m in sorted(_modules()) if m != first]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        root = (exc.name or '').split('.')[0]\n"
        "        if root in ('collective', 'topologies', ''):\n"
        "            raise\n"
        "        print('skipped', name, 'needs', exc.name)\n"  # an optional dependency (cupy) that is absent
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_collective_leaves_optional_heavy_packages_alone() -> None:
    """``import collective`` imports neither ml_dtypes nor torch: every rank of every job pays for what it imports
    (ml_dtypes alone costs several times NumPy's import), and bfloat16 is looked up when a call first needs it."""
    code = ("import sys, numpy as np, collective, collective.ops as ops\n"
            "assert 'ml_dtypes' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
            "assert ops.check_dtype(np.dtype(np.float32), None) is None\n"
            "assert 'ml_dtypes' not in sys.modules\n"
            "bf = ops.BFLOAT16\n"
            "assert bf is None or (bf.name == 'bfloat16' and ops.check_dtype(bf, ops.OPS['sum']) is None\n"
            "                      and ops.dtype_from_code(ops.dtype_code(bf)) == bf and ops.bfloat16() is bf)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
