"""What ``ray job submit --working-dir .`` would upload from a checkout that also holds a
virtual environment, data and run outputs (docs/usage.md, "Running on a cluster").

Ray builds the job's package with ``ray._private.runtime_env.packaging.create_package``, which
walks the directory and skips what ``.gitignore`` and ``.rayignore`` match. The test builds that
package locally (nothing is uploaded) from a copy of the repository's ignore files and a few of
its real files, next to a fake virtual environment and other local build products.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = ["pading/__init__.py", "pipelines/full.py", "configs/demo.yaml", "README.md", "pyproject.toml"]
LOCAL = [".venv/pyvenv.cfg", ".venv/lib/python3.11/site-packages/torch/__init__.py", "venv/bin/python",
         "venv-gpu/pyvenv.cfg", "env/bin/activate", ".tox/py311/log.txt", "outputs/demo/results.json",
         "datasets/coco/val2017/1.jpg", "mlruns/0/meta.yaml", "mlflow.db", "pading/__pycache__/x.cpython-311.pyc",
         "pading.egg-info/PKG-INFO", ".pytest_cache/v/cache/nodeids", ".ruff_cache/CACHEDIR.TAG",
         ".ipynb_checkpoints/a.ipynb", "build/lib/x.py"]
LOCAL_ROOTS = [".venv", "venv", "venv-gpu", "env", ".tox", "outputs", "datasets", "mlruns", "mlflow.db",
               "pading/__pycache__", "pading.egg-info", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "build"]


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for name in (".gitignore", ".rayignore", *CODE):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    for name in LOCAL:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("local, not code\n")
    return root


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["gitignore+rayignore", "rayignore-only"])
def test_the_job_package_holds_the_code_and_no_local_environment(tmp_path, include_gitignore):
    from ray._private.runtime_env.packaging import create_package

    root = _checkout(tmp_path)
    package = tmp_path / "package.zip"
    create_package(str(root), package, include_gitignore=include_gitignore)
    names = {n.rstrip("/") for n in zipfile.ZipFile(package).namelist()}
    assert set(CODE) <= names  # the code goes
    leaked = sorted(n for n in names if any(n == local or n.startswith(local + "/") for local in LOCAL_ROOTS))
    assert not leaked, leaked


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
@pytest.mark.parametrize("path", [".venv", ".venv/", ".venv/bin/python", "venv/bin/python"])
def test_git_ignores_the_virtual_environment_whatever_its_kind(path):
    """``.venv`` as a symlink to an environment elsewhere is not a directory to git, so the
    ``.venv/`` pattern alone would leave it showing in ``git status``; the plain name is listed too."""
    proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, capture_output=True)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_the_ignore_files_agree_on_local_environments():
    """``.rayignore`` covers every local-environment pattern of ``.gitignore``: the package stays
    small even when Ray is told to ignore ``.gitignore`` (``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``)."""
    def patterns(name: str) -> set[str]:
        return {line.strip() for line in (REPO / name).read_text().splitlines()
                if line.strip() and not line.startswith("#")}

    assert patterns(".gitignore") <= patterns(".rayignore") | {".whl/", "/.whl/", "/.gl/"}
