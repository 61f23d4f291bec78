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
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
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
