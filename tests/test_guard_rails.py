"""The project's rules that a linter checks (pyproject.toml, ``[tool.ruff.lint]``), checked to
fire: ``pading/`` never imports Ray (TID251), no blind ``except Exception`` without a reason
(BLE001), no ``noqa`` for a rule that does not fire (RUF100)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff(source: str, filename: str) -> str:
    """ruff's findings for ``source`` as if it were ``filename`` in this repository."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--stdin-filename", filename, "-"], input=source, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


@pytest.mark.parametrize("source", ["import ray\n", "from ray import serve\n", "import ray.train\n"])
def test_the_library_may_not_import_ray(source):
    assert "TID251" in _ruff(source, "pading/training/probe.py")
    for allowed in ("pipelines/probe.py", "benchmarks/probe.py", "tests/probe.py"):
        assert "TID251" not in _ruff(source, allowed), allowed


def test_blind_excepts_and_stale_noqa_are_errors():
    blind = "def f():\n    try:\n        return 1\n    except Exception:\n        return 2\n"
    assert "BLE001" in _ruff(blind, "pading/probe.py")
    assert "RUF100" in _ruff("x = 1  # noqa: F401\n", "pading/probe.py")


def test_the_tree_passes_the_rules():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "pading", "pipelines", "tests",
                           "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
