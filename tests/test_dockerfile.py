"""The image recipe: the Ray base matches the pinned Ray, and the copied tree installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import ray

from .conftest import REPO

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


def test_the_tree_the_image_copies_builds_a_complete_package(tmp_path):
    copied = re.findall(r"^COPY --chown=\S+ (.+) \S+$", DOCKERFILE, flags=re.M)
    tree = tmp_path / "tree"
    tree.mkdir()
    for entry in " ".join(copied).split():
        source = REPO / entry
        target = tree / entry
        shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(tree)], check=True, timeout=300)
    (wheel,) = wheel_dir.glob("hlbd_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"hlbd_ray/{p.name}" for p in (REPO / "hlbd_ray").glob("*.py")}
    assert modules <= names
    assert (tree / "jobs/sweep.py").is_file() and (tree / "conf/sweep.yaml").is_file()
