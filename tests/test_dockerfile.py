"""The image recipe: the Ray base matches the pinned Ray; the copied tree installs, data included."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import ray

from .conftest import HLBD_DIR, HLBD_FILES, REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE, flags=re.M))


def test_base_image_is_the_official_ray_image_of_the_pinned_version():
    args = build_args()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{VARIANT\}$", DOCKERFILE, flags=re.M)
    pin = re.search(r'"ray\[default,train,tune\]>=([\d.]+),<([\d.]+)"',
                    (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin a Ray range"
    low, high = (tuple(int(x) for x in v.split(".")) for v in pin.groups())
    version = tuple(int(x) for x in args["RAY_VERSION"].split("."))
    assert low <= version < high
    assert args["RAY_VERSION"] == ray.__version__          # the version the tests ran with
    assert args["VARIANT"].endswith("-cpu")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds from exactly the files the Dockerfile copies."""
    tmp_path = tmp_path_factory.mktemp("image")
    copied = re.findall(r"^COPY --chown=\S+ (.+) \S+$", DOCKERFILE, flags=re.M)
    tree = tmp_path / "tree"
    tree.mkdir()
    for entry in " ".join(copied).split():
        source = REPO / entry
        target = tree / entry
        shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    assert (tree / "jobs/sweep.py").is_file() and (tree / "conf/sweep.yaml").is_file()
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(tree)], check=True, timeout=300)
    (built,) = wheel_dir.glob("hlbd_ray-*.whl")
    return built


def test_the_tree_the_image_copies_builds_a_complete_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        modules = {f"hlbd_ray/{p.name}" for p in (REPO / "hlbd_ray").glob("*.py")}
        assert modules <= names
        # The shipped HLBD files and their licence are package data, byte for byte.
        for name in (*HLBD_FILES, "LICENSE"):
            assert archive.read(f"hlbd_ray/hlbd_data/{name}") == (HLBD_DIR / name).read_bytes(), name


def test_the_installed_package_resolves_the_short_names_anywhere(wheel, tmp_path):
    # Installed from the wheel, the image's own check passes in another working directory
    # and the names resolve to the installed files, not to this checkout.
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                    "--target", str(site), str(wheel)], check=True, timeout=300)
    (check,) = re.findall(r"^RUN cd / && (python -c .+)$", DOCKERFILE, flags=re.M)
    show = "import hlbd_ray.hlbd_data as d; print(*(d.resolve(d.PREFIX + n) for n in d.FILES))"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    for code in (shlex.split(check)[2], show):
        result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(site / "hlbd_ray/hlbd_data" / n) for n in HLBD_FILES]


def test_dockerignore_keeps_the_shipped_data():
    # fnmatch's * and ? also match "/", so this is stricter than Docker's matching: it may
    # refuse a harmless pattern but never passes one that drops the data.
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "!"))]
    paths = {"hlbd_ray", "hlbd_ray/hlbd_data", *(f"hlbd_ray/hlbd_data/{n}" for n in (*HLBD_FILES, "LICENSE"))}
    for pattern in patterns:
        bare = pattern.removeprefix("**/").rstrip("/")
        hits = [p for p in paths if fnmatch.fnmatch(p, pattern.rstrip("/"))
                or (pattern.startswith("**/") and fnmatch.fnmatch(p.rsplit("/", 1)[-1], bare))]
        assert not hits, f".dockerignore pattern {pattern!r} drops {hits}"
