"""The code in README.md and docs/*.md runs, prints what the page says it prints, and the site builds.

Markers, on the line before a ```python fence (blank lines between are allowed):

* none, or ``<!-- run -->``: run in a fresh Python process;
* ``<!-- run: P=2 -->``: run under mpiexec on that many ranks (tests/mpi_util.mpirun);
* ``fails`` among the options (``<!-- run: P=2 fails -->``): the program must exit non-zero;
* ``<!-- skip: why -->``: not run (the reason is required).

A ```text fence preceded by ``<!-- output -->`` right after a run block lists lines that must appear in the
block's output, in order; ``...`` inside a line matches anything.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mpi_util import mpirun

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*(run|skip|output)\b:?\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    """One runnable code block of a page."""

    page: Path
    line: int
    code: str
    nprocs: int | None  # None: a plain Python process
    fails: bool
    expect: list[str]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The runnable Python blocks of ``page`` with their options and expected output."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    mark: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        m = _MARK.match(lines[i].strip())
        if m:
            mark = (m.group(1), m.group(2))
            i += 1
            continue
        f = _FENCE.match(lines[i])
        if not f:
            if lines[i].strip():
                mark = None
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[start + 1:j]
        lang = f.group(1)
        if lang == "python" and not (mark and mark[0] == "skip"):
            opts = mark[1].split() if mark and mark[0] == "run" else []
            nprocs = None
            for o in opts:
                if o.startswith("P="):
                    nprocs = int(o[2:])
                elif o != "fails":
                    raise ValueError(f"{page}:{start + 1}: unknown run option {o!r}")
            found.append(Block(page, start + 1, "\n".join(body) + "\n", nprocs, "fails" in opts, []))
        elif lang == "python" and mark and mark[0] == "skip" and not mark[1]:
            raise ValueError(f"{page}:{start + 1}: <!-- skip --> needs a reason")
        elif mark and mark[0] == "output":
            if not found or lang != "text":
                raise ValueError(f"{page}:{start + 1}: <!-- output --> must mark a ```text block after a run block")
            found[-1].expect = [ln for ln in body if ln.strip()]
        mark = None
        i = j + 1
    return found


ALL = [b for p in PAGES if p.exists() for b in blocks(p)]


def _expect_in_order(expect: list[str], output: str) -> None:
    pos = 0
    for want in expect:
        pat = re.compile(".*?".join(re.escape(part) for part in want.strip().split("...")))
        m = pat.search(output, pos)
        assert m, f"expected line not in the output (after position {pos}):\n  {want}\n--- output ---\n{output}"
        pos = m.end()


def test_pages_have_runnable_code() -> None:
    """The marker parser finds the blocks it should (a page losing its markers would silently test nothing)."""
    pages = {b.page.name for b in ALL}
    assert {"README.md", "getting-started.md", "troubleshooting.md"} <= pages
    assert any(b.nprocs == 2 for b in ALL) and any(b.fails for b in ALL) and any(b.expect for b in ALL)


def _run(block: Block, tmp: Path) -> tuple[int, str, bool]:
    """Exit status, output and whether it timed out, for one block."""
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "block.py"
    script.write_text(block.code, encoding="utf-8")
    if block.nprocs is None:
        env = dict(os.environ, COLLECTIVE_CALIBRATE="0")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        try:
            p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=False,
                               cwd=str(tmp), timeout=120)
        except subprocess.TimeoutExpired as e:
            return -1, str(e.stdout or "") + str(e.stderr or ""), True
        return p.returncode, p.stdout + p.stderr, False
    # Calibration measures links for the cost model, which no block needs; skipping it saves each job time.
    r = mpirun(script, block.nprocs, timeout=120, env={"COLLECTIVE_CALIBRATE": "0"})
    return r.returncode, r.output, r.timed_out


def _mkdocs_build(site: Path) -> tuple[int, str, bool] | None:
    """``mkdocs build --strict`` into ``site``; None when mkdocs or mkdocstrings is not installed."""
    import importlib.util

    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        return None
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    try:
        p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=300, check=False)
    except subprocess.TimeoutExpired as e:
        return -1, str(e.stdout or "") + str(e.stderr or ""), True
    return p.returncode, p.stdout + p.stderr, False


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every block's outcome, and the site build's (key "mkdocs", the site in "site").

    They run side by side, a few at a time: most of a job's time is start-up and waiting, not CPU.
    """
    base = tmp_path_factory.mktemp("doc-blocks")
    with ThreadPoolExecutor(max_workers=5) as pool:
        site = pool.submit(_mkdocs_build, base / "site")
        futures = {b.id: pool.submit(_run, b, base / f"b{i}") for i, b in enumerate(ALL)}
        out: dict[str, object] = {k: f.result() for k, f in futures.items()}
        out["mkdocs"] = site.result()
        out["site"] = base / "site"
        return out


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_doc_block_runs(block: Block, results: dict[str, object]) -> None:
    """One block ran (in a subprocess or under mpiexec) with the exit status and output its page says."""
    rc, out, timed_out = results[block.id]
    assert not timed_out, f"{block.id}: timed out\n{out}"
    if block.fails:
        assert rc != 0, f"{block.id}: expected to fail, exited 0\n{out}"
    else:
        assert rc == 0, f"{block.id}: exit {rc}\n{out}"
    _expect_in_order(block.expect, out)


def test_mkdocs_build_strict(results: dict[str, object]) -> None:
    """``mkdocs build --strict`` (what ``make docs`` runs) passes: no warning, no broken link, API pages render."""
    if results["mkdocs"] is None:
        pytest.skip("mkdocs/mkdocstrings are not installed (pip install '.[docs]'): the site was not built")
    rc, out, timed_out = results["mkdocs"]
    assert not timed_out and rc == 0, out
    site = results["site"]
    api = (site / "reference" / "communicator" / "index.html").read_text(encoding="utf-8")
    assert "collective.Communicator.allreduce" in api and "collective.Communicator.alloc" in api
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "collective-bench" in cli and "--tune" in cli and "--emulate" in cli


def test_readme_is_short() -> None:
    """The README stays an entry point: at most 200 lines of reasonable width."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    wide = [i + 1 for i, ln in enumerate(lines) if len(ln) > 160 and not ln.startswith("|")]
    assert not wide, f"README lines wider than 160 characters: {wide}"


def _gen_performance():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_performance", ROOT / "docs" / "gen_performance.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gen  # dataclasses look their module up there
    spec.loader.exec_module(gen)
    return gen


def test_performance_page_is_generated() -> None:
    """docs/performance.md is what docs/gen_performance.py writes from docs/bench/*.json, and uses every file."""
    gen = _gen_performance()
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert page == gen.render(), "docs/performance.md is stale: run python docs/gen_performance.py"
    for f in sorted((ROOT / "docs" / "bench").glob("*.json")):
        assert f"docs/bench/{f.name}" in page, f"{f.name} is not on the Performance page"
    for run in gen.RUNS:
        if run.plot:
            assert (ROOT / "docs" / "img" / f"{run.name}.png").is_file(), "run python docs/gen_performance.py --plots"


def test_readme_headline_table_matches_the_data() -> None:
    """The README's benchmark table is the one docs/gen_performance.py computes from docs/bench."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _gen_performance().headline() in readme, "README's table differs from docs/gen_performance.headline()"

