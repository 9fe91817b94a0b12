"""SPEC §12: every name has one owner below its users, so the package's imports (function-level ones
included) form layers with no cycle; coupled_net never imports its own Hydra plugin; a module-level
import is dodged inside a function only to keep start-up fast, and says so."""

from __future__ import annotations

from helpers import REPO
from helpers.imports import cycles, graph, imports, layers

PACKAGES = ["coupled_net", "hydra_plugins"]
MAX_LAYERS = 10


def write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walker_finds_a_cycle_hidden_in_a_function_level_relative_import(tmp_path):
    write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from .b import x\n",
                     "pkg/b.py": "from pkg import c\nx = 1\n",
                     "pkg/c.py": "def f():\n    from . import a  # dodges the cycle\n    return a\n",
                     "pkg/leaf.py": "import os\n"})
    found = imports(tmp_path, ["pkg"])
    assert {(i.source, i.target, i.nested, i.commented) for i in found} == {
        ("pkg.a", "pkg.b", False, False), ("pkg.b", "pkg.c", False, False), ("pkg.c", "pkg.a", True, True)}
    assert cycles(graph(found)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_layers_put_each_module_one_above_the_highest_it_imports(tmp_path):
    write(tmp_path, {"pkg/__init__.py": "", "pkg/low.py": "", "pkg/mid.py": "from . import low\n",
                     "pkg/top.py": "from .low import x\nfrom .mid import y\n", "pkg/side.py": "import pkg.low\n"})
    g = graph(imports(tmp_path, ["pkg"]))
    assert cycles(g) == []
    assert layers(g) == {"pkg.low": 0, "pkg.mid": 1, "pkg.top": 2, "pkg.side": 1}


def test_the_package_imports_have_no_cycle_and_fit_in_ten_layers():
    g = graph(imports(REPO, PACKAGES))
    assert cycles(g) == []
    floors = layers(g)
    assert max(floors.values()) + 1 <= MAX_LAYERS, sorted(floors.items(), key=lambda kv: kv[1])
    assert floors["coupled_net.errors"] == 0  # the exit policy lives with the errors, at the bottom


def test_coupled_net_never_imports_its_own_hydra_plugin():
    assert [(i.source, i.line) for i in imports(REPO, PACKAGES)
            if i.source.startswith("coupled_net") and i.target.startswith("hydra_plugins")] == []


def test_a_function_level_import_of_the_package_says_why_it_is_not_at_the_top():
    silent = [f"{i.source}:{i.line} imports {i.target}" for i in imports(REPO, PACKAGES) if i.nested
              and not i.commented]
    assert silent == []
