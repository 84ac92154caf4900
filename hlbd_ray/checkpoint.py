"""Checkpoints as explicit data: everything a run needs to continue step for step.

A checkpoint folder holds `state.pt` (model, optimizer, scheduler, scaler, progress
with counters and history, tokenizer, config; written by rank 0) and one `rng_rank<k>.pt` per worker (each
worker's random streams differ). Loading never unpickles code: `weights_only=True`, and
the structure is checked before anything is used.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlbd_ray.errors import UserError
from hlbd_ray.files import atomic_torch_save

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
REQUIRED_KEYS = {"format_version", "model", "optimizer", "scheduler", "scaler", "progress",
                 "tokenizer", "config"}


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, tampered with or from another model."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states as plain tensors and lists."""
    # legacy=True is numpy's default, spelled out: numpy 2's stubs type a bare call as the dict form.
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # the dict form comes only from a non-MT19937 generator
        raise TypeError(f"numpy's global generator is not MT19937: {np_state.get('bit_generator')}")
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants tuples; the safe loader may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(folder: str | Path, state: dict[str, Any] | None, rank: int) -> Path:
    """Write this worker's part: rank 0 the shared state, every rank its RNG streams."""
    folder = Path(folder)
    if state is not None:
        missing = REQUIRED_KEYS - {"format_version"} - set(state)
        if missing:
            raise ValueError(f"checkpoint state lacks {sorted(missing)}")
        atomic_torch_save(folder / STATE_FILE, {"format_version": FORMAT_VERSION, **state})
    atomic_torch_save(folder / rng_file(rank), capture_rng())
    return folder


def _safe_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as err:  # the safe unpickler raises several types; all mean "refused"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} refused (not a plain-data checkpoint): {first}") from None


def load_checkpoint(folder: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state, this rank's RNG state or None if the run had fewer workers)."""
    folder = Path(folder)
    state = load_state(folder)
    rng_path = folder / rng_file(rank)
    return state, (_safe_load(rng_path) if rng_path.exists() else None)


def load_state(folder: str | Path) -> dict[str, Any]:
    """The shared state alone (what inference needs), checked like any checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder missing: {folder}")
    state = _safe_load(folder / STATE_FILE)
    if not isinstance(state, dict) or not REQUIRED_KEYS <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {folder / STATE_FILE} has an unexpected structure: {got}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {folder} has format {state['format_version']}, expected {FORMAT_VERSION}")
    return state
