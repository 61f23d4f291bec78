"""Imports of collective.trainer, collective.topologies and collective.bench from a source checkout."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

# The trainer, the Schedules and the benchmark tool are this package's subpackages (collective.trainer,
# collective.topologies, collective.bench). Installed, they sit inside it; in a source checkout their folders
# are siblings of this one, and this finder maps exactly those three names onto them, so a checkout on
# PYTHONPATH imports its own copies rather than those of an editable install elsewhere.
_SUBPACKAGES = ("trainer", "topologies", "bench")
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``collective.<sub>`` in the sibling folder ``<sub>/`` of a source checkout."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, sub = fullname.partition(".")
        if prefix != "collective" or sub not in _SUBPACKAGES:
            return None
        folder = os.path.join(_CHECKOUT, sub)
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


if not os.path.isdir(os.path.join(os.path.dirname(__file__), "trainer")) and all(
        os.path.isfile(os.path.join(_CHECKOUT, sub, "__init__.py")) for sub in _SUBPACKAGES):
    sys.meta_path.insert(0, _CheckoutFinder())
