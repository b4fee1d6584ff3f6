"""What every reliability case asserts: one-line errors, untouched inputs, complete-or-absent outputs.

Import as ``from reliability.support import ...`` (tests/ is on the path).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "deltatune.cli"]


def tree_digest(root: str | os.PathLike) -> dict[str, str]:
    """Relative path -> sha256 (or "<dir>") for everything below `root`, including hidden files."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    digest = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        digest[relative] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def run_cli(*argv: str, cwd: str | os.PathLike | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `deltatune ARGV` in a fresh process (offline), capturing text output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    """The CLI failed with `status`, printed exactly one non-empty stderr line and no traceback; that line
    contains every fragment (case-insensitive). Returns the line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def assert_one_line_message(error: BaseException, *fragments: str) -> str:
    """An API error whose message is one line containing every fragment (case-insensitive)."""
    message = str(error)
    assert "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)
    return message
