"""MkDocs hooks: the command-line tools' ``--help`` on the reference page, and docstrings' Sphinx roles tidied.

``<!-- help: MODULE[|MODULE...] -->`` markers are replaced by that tool's
``--help`` text, run at build time, so the reference cannot drift from the
code. The first module of the list that runs is used (so the page survives a
tool moving between packages); if none does, the build fails.

Docstrings use Sphinx roles (``:class:`Communicator```), which the API pages
would show literally; the role prefix is dropped and the name stays as code.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_MARKER = re.compile(r"<!--\s*help:\s*([\w.|]+)\s*-->")
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|obj|exc):(?=<code>)")


def cli_help(modules: str) -> str:
    """``python -m MODULE --help`` for the first of ``modules`` (separated by ``|``) that exits 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "100"  # argparse wraps to the terminal width: pin it so the page is the same everywhere
    errors = []
    for module in modules.split("|"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, check=False,
                           cwd=str(ROOT), timeout=60)
        if p.returncode == 0:
            return p.stdout.rstrip()
        errors.append(f"{module}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    raise RuntimeError("docs/hooks.py: no --help for " + modules + ":\n" + "\n".join(errors))


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each help marker with a fenced block of the tool's help text."""
    return _MARKER.sub(lambda m: "```text\n" + cli_help(m.group(1)) + "\n```", markdown)


def on_page_content(html: str, page, config, files) -> str:
    """Drop Sphinx role prefixes (``:meth:``) left in front of code spans rendered from docstrings."""
    return _ROLE.sub("", html)
