"""Shared fixtures: micro configs, small prepared data, and the real HLBD files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hlbd_ray.config import Config, load_config
from hlbd_ray.data import PreparedData, prepare_data

REPO = Path(__file__).resolve().parents[1]
# The real HLBD files ship inside the package (hlbd_ray/hlbd_data, package data); tests
# read them from this checkout and fail loudly when one is missing instead of skipping.
HLBD_DIR = REPO / "hlbd_ray" / "hlbd_data"
HLBD_FILES = ("HLBD_Full_V2.json", "HLBD_Hardcore_Full_V2.json", "HLBD_Hardcore_Full.json")

# Settings every Ray process of the test session inherits: Ray Train's controller polls
# its workers every 2 s by default and each report waits for that poll; usage stats would
# try the network; the private, temporary test clusters need no auth token; and
# undeduplicated logs keep every worker's lines for the tests that read them.
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
os.environ.update(RAY_TEST_ENV)

MICRO = ["model.d_model=32", "model.num_heads=4", "model.num_layers=2", "model.d_ff=64",
         "model.dropout=0.1", "data.generated_per_module=24", "train.max_len=96",
         "train.batch_size=8", "train.grad_accum=2", "train.report_every_steps=2",
         "train.warmup_steps=2", "train.precision=fp32",
         "train.progress_bar=false"]


def micro_config(*overrides: str, output_dir: str | Path = "runs") -> Config:
    return load_config(None, [*MICRO, f"output_dir={output_dir}", *overrides])


@dataclass
class FakeTrial:
    """The attributes of a Tune Trial that the report aggregator reads."""

    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "RUNNING"
    error_file: str | None = None


@pytest.fixture(scope="session")
def micro_data() -> PreparedData:
    cfg = micro_config()
    return prepare_data(cfg.data, cfg.train.max_len)


@pytest.fixture(scope="session")
def hlbd_dir() -> Path:
    missing = [name for name in (*HLBD_FILES, "LICENSE") if not (HLBD_DIR / name).is_file()]
    assert not missing, f"the real HLBD files are expected in {HLBD_DIR}; missing: {missing}"
    return HLBD_DIR


def ray_temp_dir() -> Path:
    """Where the local clusters of this test session keep their sessions: Ray's rule
    (ray/_common/utils.py `get_default_ray_temp_dir`, not public): $RAY_TMPDIR, else
    $TMPDIR on Linux, else /tmp; then "ray"."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def run_job(script: str, *args: str, timeout: float = 600, env: dict | None = None,
            cwd: Path = REPO):
    """Run a job script as users do (a subprocess), with the test Ray settings."""
    full_env = {**os.environ, **RAY_TEST_ENV, **(env or {})}
    command = [sys.executable, str(REPO / "jobs" / script), *args]
    with subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The job prints every thread's stack on SIGQUIT (errors.run_cli): where it hung.
            proc.send_signal(signal.SIGQUIT)
            time.sleep(3)
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{script} {' '.join(args)} ran past {timeout} s\n--- stdout (tail) ---\n"
                        f"{out[-4000:]}\n--- stderr with the job's stacks (tail) ---\n{err[-12000:]}",
                        pytrace=False)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
