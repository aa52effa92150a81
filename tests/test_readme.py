"""The README's python snippets: every ``from abd_plugin... import name`` resolves, every name the
snippet calls is callable (``from abd_plugin import audit`` gave the module ``abd_plugin.audit``),
and the stand-alone audit snippet runs as printed, on a small teacher."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _imports(tree: ast.AST) -> list[tuple[str, str, str]]:
    """(module, name, bound name) of every ``from abd_plugin... import ...``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("abd_plugin"):
            out += [(node.module or "", a.name, a.asname or a.name) for a in node.names]
    return out


def _called(tree: ast.AST) -> set[str]:
    return {n.func.id for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def test_readme_has_python_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 4 and any("audit(" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_snippet_imports_resolve_and_what_it_calls_is_callable(index):
    block = python_blocks()[index]
    tree = ast.parse(block)  # every snippet is valid python (``...`` stands for the user's code)
    called = _called(tree)
    for module, name, bound in _imports(tree):
        parent = importlib.import_module(module)
        # as ``from module import name`` does: an attribute, else the submodule of that name
        obj = (getattr(parent, name) if hasattr(parent, name)
               else importlib.import_module(f"{module}.{name}"))
        if bound in called:
            assert callable(obj), (
                f"README snippet {index}: `from {module} import {name}` gives a "
                f"{type(obj).__name__}, which the snippet calls")


class _SmallTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_the_audit_snippet_runs_as_printed(capsys):
    block = next(b for b in python_blocks() if "report = audit(" in b)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    namespace: dict = {"teacher": _SmallTeacher().eval()}
    exec(compile(block, "README.md (audit snippet)", "exec"), namespace)
    from abd_plugin.audit import AuditReport

    assert isinstance(namespace["report"], AuditReport)
    assert namespace["report"].verdict in ("clean", "unsure", "poisoned")
    assert "audit: " in capsys.readouterr().out
