"""A lone copy of the checkout passes the fast tests: nothing is read from beside it.

The copy holds the tracked files (`git ls-files`) with their working-tree content: what
a clone would hold, untracked and ignored files left out (.venv, runs/, data lying
around), but with the edits about to be committed, so the test checks the code under
test rather than the last commit. It runs with this checkout's venv, PYTHONPATH pointing
at the copy so that every process imports the copy's hlbd_ray, and tests/outside_guard.py
failing the run on any file opened outside the copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .outside_guard import ENV as GUARD

pytestmark = pytest.mark.slow


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    assert listing.returncode == 0, f"this test needs a git checkout: {listing.stderr.decode()}"
    return [name for name in listing.stdout.decode().split("\0") if name]


def copy_checkout(folder: Path) -> Path:
    copy = folder / "checkout"
    for name in tracked_files():
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree stays deleted
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def test_a_lone_copy_of_the_checkout_passes_the_fast_tests(tmp_path):
    # The inner run selects "not slow", so it never reaches this test; the guard variable
    # makes sure of it.
    assert GUARD not in os.environ, "running inside the copy: this test must not recurse"
    copy = copy_checkout(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkout"]   # nothing beside it
    assert (copy / "hlbd_ray/hlbd_data/HLBD_Full_V2.json").is_file()
    assert not (copy / ".venv").exists() and not (copy / ".git").exists()
    env = {**os.environ, "PYTHONPATH": str(copy),
           GUARD: json.dumps({"copy": str(copy), "original": str(REPO)})}
    where = subprocess.run([sys.executable, "-c", "import hlbd_ray; print(hlbd_ray.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(copy / "hlbd_ray/__init__.py"), where.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "tests.outside_guard"],
                            cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert f"0 outside the copy; hlbd_ray from {copy / 'hlbd_ray/__init__.py'}" in result.stdout, tail
    assert " passed" in result.stdout and " failed" not in result.stdout and " error" not in result.stdout, tail
