"""The core's shape, checked from its source: the guard imports no defense, the defenses never see
the whole config (each gets its own section), and the core imports nothing beyond torch/numpy."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "abd_plugin"

#: modules of a defense: each is handed its own settings section, never the whole ABDConfig
DEFENSE_MODULES = ["audit.py", "eraser.py", "vaccine.py", "retrospection.py",
                   "gradient_alignment.py", "ensemble.py", "schedule.py", "domain.py",
                   "repair/base.py", "repair/mask.py", "repair/learner.py", "repair/reaudit.py"]


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported by ``path`` outside ``if TYPE_CHECKING:`` blocks (relative imports as
    written, e.g. ``.eraser``)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_guard_imports_no_defense():
    imports = _runtime_imports(CORE / "guard.py")
    for mod in (".eraser", ".vaccine", ".retrospection", ".audit", ".gradient_alignment",
                ".repair"):
        assert mod not in imports, f"guard.py imports {mod}: build defenses in defenses.py"
    assert ".defenses" in imports


@pytest.mark.parametrize("name", DEFENSE_MODULES)
def test_a_defense_never_reads_the_whole_config(name):
    imports = _runtime_imports(CORE / name)
    assert not {".config", "..config", ".defenses", "..defenses"} & imports, \
        f"{name} imports the config: hand it its own section instead"


def test_importing_the_core_imports_only_torch_and_numpy():
    import sys

    allowed = {"torch", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for path in list(CORE.glob("*.py")) + list((CORE / "repair").glob("*.py")):
        if path.name == "__main__.py":  # `python -m abd_plugin` is the kit's command line
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: what `import abd_plugin` runs
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"{path.name} imports {mod}"
