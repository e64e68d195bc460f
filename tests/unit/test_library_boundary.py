"""The library's boundary: nothing under resnet_imagenet/ imports the KFP side.

kfp and kfp-kubernetes, and this repository's ``pipelines/`` and ``components/``, are the layer
on top of the library; the library runs (and its images start) without them. Read from the
source (AST), so an import inside a function, under ``TYPE_CHECKING`` or by name through
``importlib.import_module`` counts as well.
"""

from __future__ import annotations

import pytest

from tests.support.imports import imported_modules
from tests.support.repo import ROOT

LIBRARY = ROOT / "resnet_imagenet"
FORBIDDEN = {"kfp", "kfp_kubernetes", "pipelines", "components"}


def test_the_scan_sees_every_kind_of_import():
    source = ("import kfp.dsl\nfrom pipelines import params\nimport os, components.train\n"
              "def f():\n    from kfp_kubernetes import x\n"
              "importlib.import_module('pipelines.run_local')\n__import__('kfp')\n"
              "from . import sibling\n")
    tops = [name.split(".")[0] for _, name in imported_modules(source)]
    assert tops == ["kfp", "pipelines", "components", "os", "kfp_kubernetes", "pipelines", "kfp"]


SOURCES = sorted(LIBRARY.rglob("*.py"))


def test_the_library_has_sources():
    assert len(SOURCES) > 20 and LIBRARY / "cli.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(LIBRARY.parent)))
def test_no_library_module_imports_the_kfp_side(path):
    module = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    bad = [f"{path.relative_to(LIBRARY.parent)}:{line}: {name}"
           for line, name in imported_modules(path.read_text(), module)
           if name.split(".")[0] in FORBIDDEN]
    assert not bad, "the library imports the KFP side:\n" + "\n".join(bad)


MAX_LINES = 600


def test_no_library_module_is_over_600_lines():
    """A module one can read in one sitting; split by concern past that (docs/ holds the why)."""
    lengths = {str(path.relative_to(LIBRARY)): len(path.read_text().splitlines())
               for path in LIBRARY.rglob("*.py")}
    assert len(lengths) > 40  # the scan found the library
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
