"""Checkpoints: plain data only, tampering refused, RNG streams restored exactly."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from hlbd_ray.checkpoint import STATE_FILE, CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from hlbd_ray.session import LocalSession
from hlbd_ray.train import TrainRun, train_locally

from .conftest import micro_config


class Payload:
    """Unpickling this would run code: it touches the file named in its argument."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_rng_streams_are_restored_exactly():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == first


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path, micro_data):
    cfg = micro_config("train.epochs=1", output_dir=tmp_path)
    folder = train_locally(cfg, micro_data, tmp_path / "run").checkpoints[-1]
    state = torch.load(folder / STATE_FILE, weights_only=True)
    marker = tmp_path / "pwned"
    state["progress"]["stop_reason"] = Payload(marker)
    with open(folder / STATE_FILE, "wb") as handle:
        pickle.dump(state, handle, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(folder, rank=0)
    assert not marker.exists()


def test_a_checkpoint_with_the_wrong_structure_or_vocabulary_is_refused(tmp_path, micro_data):
    torch.save({"model": {}}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="unexpected structure"):
        load_checkpoint(tmp_path, rank=0)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nowhere", rank=0)

    cfg = micro_config("train.epochs=1", output_dir=tmp_path)
    folder = train_locally(cfg, micro_data, tmp_path / "run").checkpoints[-1]
    state = torch.load(folder / STATE_FILE, weights_only=True)
    state["tokenizer"] = {**state["tokenizer"], "tokens": list(reversed(state["tokenizer"]["tokens"]))}
    torch.save(state, folder / STATE_FILE)
    with pytest.raises(CheckpointError, match="different vocabulary"):
        TrainRun(cfg, micro_data, LocalSession(tmp_path / "again", resume_from=folder))


def test_every_rank_writes_its_own_rng_and_only_rank_zero_the_state(tmp_path):
    save_checkpoint(tmp_path, None, rank=1)
    assert [p.name for p in tmp_path.iterdir()] == ["rng_rank1.pt"]
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path, {"model": {}}, rank=0)


def test_a_checkpoint_scratch_folder_left_by_a_killed_worker_is_removed_by_the_next(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile

    from hlbd_ray.session import SCRATCH_PREFIX, scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{SCRATCH_PREFIX}{int(gone.stdout)}-abc_123"
    running = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def_456"      # a live process's
    older = tmp_path / f"{SCRATCH_PREFIX}x7dcopol"                      # no process id in it
    for folder in (orphan, running, older):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x" * 100)
    with scratch_dir() as folder:
        assert folder.parent == tmp_path and folder.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}-")
        assert not orphan.exists() and running.is_dir() and older.is_dir()
    assert not folder.exists()
