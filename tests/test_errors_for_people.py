"""Errors meant for people come from deltatune.errors (one line naming the problem and the fix, printed by the
CLI without a traceback); a bare ValueError / RuntimeError / ... raised by the package would reach users as a
traceback. OSError re-raised with an errno (core/atomic.py) is the operating system's own error and allowed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

import deltatune as dt
from deltatune.errors import UnsupportedLayerError

SOURCE = Path(__file__).resolve().parents[1] / "src" / "deltatune"
BUILTIN_ERRORS = {"Exception", "ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "LookupError"}


def _raised_builtins(path: Path, root: Path = SOURCE) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        raised = node.exc if isinstance(node, ast.Raise) else None
        called = raised.func if isinstance(raised, ast.Call) else raised
        if isinstance(called, ast.Name) and called.id in BUILTIN_ERRORS:
            found.append(f"{path.relative_to(root)}:{node.lineno}: raise {called.id}")
    return found


def test_the_package_raises_no_bare_builtin_error():
    found = [hit for path in sorted(SOURCE.rglob("*.py")) for hit in _raised_builtins(path)]
    assert found == []


def test_the_check_sees_a_bare_raise(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    raise ValueError('x')\n\ndef g():\n    raise RuntimeError\n")
    assert _raised_builtins(probe, tmp_path) == ["probe.py:2: raise ValueError", "probe.py:5: raise RuntimeError"]


def test_a_convolution_with_non_zero_padding_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedLayerError, match="padding_mode='reflect'.*exclude it"):
        dt.adapt(model, dt.LoRAConfig(rank=1, targets=["0"]))
