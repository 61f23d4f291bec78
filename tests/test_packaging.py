"""The built wheel: one top-level package (collective, with trainer/topologies/bench inside), the free distribution
name in every install hint, a typed marker, and no upper bound on torch for users."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("collective", "trainer", "topologies", "bench", "docs", "examples", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # A copy of the sources keeps the build's egg-info and build/ folders out of the checkout.
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            dst = build / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "-w", str(out), str(build)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_one_top_level_package(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"collective"}, sorted(tops)
    (info,) = dist_info
    assert info.startswith("pycollective-"), info
    names = set(wheel.namelist())
    for sub in ("trainer", "topologies", "bench"):
        assert f"collective/{sub}/__init__.py" in names, sub
    assert "collective/py.typed" in names
    assert "collective/horovod/torch/__init__.py" in names
    # The one C extension (optional for users without a compiler; the test machines have gcc and Python's headers).
    assert [n for n in names if n.startswith("collective/_stream.") and n.endswith(".so")], sorted(names)
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "collective-bench = collective.bench.__main__:main" in entry_points
    assert "collective-run = collective.run:main" in entry_points
    metadata = wheel.read(f"{info}/METADATA").decode()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist: torch"):
            spec = line.partition(";")[0]
            assert "<" not in spec and "==" not in spec, line  # users inherit no upper bound


def test_install_hints_name_the_distribution() -> None:
    """`pip install 'collective[...]'` would install someone else's project from PyPI."""
    bad = re.compile(r"pip install ['\"]?collective\[")
    found = []
    for top in SOURCES:
        path = ROOT / top
        for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if f.suffix in (".py", ".md") and bad.search(f.read_text(errors="replace")):
                found.append(str(f.relative_to(ROOT)))
    assert not found, found


def test_version_matches_the_project() -> None:
    import collective

    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{collective.__version__}"' in text
    assert collective.__version__ in (ROOT / "CHANGELOG.md").read_text()


def test_fresh_venv_install_runs_the_readme_example(tmp_path: Path) -> None:
    """`pip install '.[mpi]'` into a new virtual environment: one top-level package, and the README's ten-line
    example runs with that environment's collective-run (pip's cache usually has mpi4py and Open MPI from
    the project's own install)."""
    import os

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, bin_ = venv / "bin" / "python", venv / "bin"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[mpi]"], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {p.name for p in Path(site).iterdir() if p.name.split("-")[0] in
            ("collective", "trainer", "bench", "topologies", "pycollective")}
    assert {n for n in ours if not n.endswith(".dist-info")} == {"collective"}, sorted(ours)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Ten lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(block)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # that environment's package, not the checkout
    run = subprocess.run([str(bin_ / "collective-run"), "-n", "2", str(py), str(tmp_path / "example.py")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(line.split()[0] for line in run.stdout.splitlines() if line.strip()) == ["0", "1"], run.stdout
