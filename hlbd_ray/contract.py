"""The training report, declared once: every key a report carries, what kind of value it
holds and where the report files keep it.

The training loop fills a `Report` (so a key it misses or invents fails there), Tune adds
the keys of `TuneKeys` to each result, and the files, curves, status line, summary and
renderer take their columns from the groups derived below. Renaming a quantity is one
line here; `tests/test_contract.py` fails when a writer and this contract drift apart.

Flags: `epoch` = a column of epochs.parquet (the value at the epoch's end); `last` = a
column of trials.parquet (the trial's last value: counters under their own name,
measurements as `last_<name>`); `best` = "min" or "max": trials.parquet keeps the best
value over the trial's epochs as `best_<name>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any


def _q(kind: type, *, epoch: bool = False, last: bool = False, best: str | None = None) -> Any:
    return field(metadata={"kind": kind, "epoch": epoch, "last": last, "best": best})


@dataclass
class Report:
    """What every report of a training run carries (plain Python values; None = missing)."""

    epoch: int = _q(int, last=True)               # the epoch the report belongs to (0-based)
    epochs_done: int = _q(int, last=True)         # epochs finished
    step: int = _q(int, epoch=True, last=True)    # optimizer steps done
    batches: int = _q(int, epoch=True, last=True)  # micro-batches done (global index of the next)
    batch_start: int = _q(int)                    # global micro-batch index of batch_losses[0]
    batch_losses: list = _q(list)                 # each micro-batch's true loss since the last report
    epoch_batches: int = _q(int)                  # micro-batches per epoch
    epoch_end: bool = _q(bool)                    # closes an epoch (carries validation)
    epoch_loss: float | None = _q(float, epoch=True, last=True)
    loss: float | None = _q(float, last=True)     # the window's token-mean loss
    ppl: float | None = _q(float, last=True)
    acc: float | None = _q(float, last=True)
    lr: float | None = _q(float, epoch=True, last=True)
    grad_norm: float | None = _q(float, epoch=True, last=True)
    fw_ms: float | None = _q(float)
    bw_ms: float | None = _q(float)
    tokens_per_s: float | None = _q(float, epoch=True, last=True)
    skipped_steps: int = _q(int, last=True)
    val_loss: float | None = _q(float, epoch=True, last=True, best="min")
    val_ppl: float | None = _q(float, epoch=True, last=True, best="min")
    val_acc: float | None = _q(float, epoch=True, last=True, best="max")
    val_exact: float | None = _q(float, epoch=True, last=True, best="max")
    val_step: int = _q(int, epoch=True, last=True)  # the step validation ran at (-1: not yet)
    # Per HLBD module of the validation split: {module: {"loss": .., "exact": ..}}; Tune
    # flattens it to `val_modules/<module>/loss`; the report keeps it in modules.parquet.
    val_modules: dict = _q(dict)
    d_model: int = _q(int, last=True)
    num_heads: int = _q(int, last=True)
    head_dim: int = _q(int, last=True)
    precision: str = _q(str)
    stop_reason: str = _q(str)                    # why the run stopped itself ("" if it did not)
    seed: int = _q(int, last=True)                # train.seed of the run (a repeat's own seed)
    # What Ray Train ranks this report's checkpoint by: the sweep metric, always finite
    # (train.checkpoint_score); only epoch ends carry a checkpoint.
    checkpoint_score: float = _q(float)

    def to_dict(self) -> dict[str, Any]:
        """The report as Ray sends it (a shallow dict: the values are already plain)."""
        return {k: getattr(self, k) for k in REPORT_KEYS}


@dataclass
class TuneKeys:
    """Keys Tune (and Train's report callback into it) add to a trial's results."""

    training_iteration: int = _q(int, last=True)
    time_total_s: float | None = _q(float, epoch=True, last=True)
    # Epoch ends only: where Train persisted the epoch's checkpoint (a path on the storage
    # filesystem), added by Ray's TuneReportCallback; epochs.parquet keeps it as `checkpoint`.
    checkpoint_path: str | None = _q(str)


REPORT_KEYS = tuple(f.name for f in fields(Report))
_ALL = (*fields(Report), *fields(TuneKeys))


def _names(flag: str, kind: type | None = None, other: bool = False) -> tuple[str, ...]:
    return tuple(f.name for f in _ALL if f.metadata[flag]
                 and (kind is None or (f.metadata["kind"] is kind) != other))


EPOCH_FLOATS, EPOCH_INTS = _names("epoch", float), _names("epoch", float, other=True)
LAST_FLOATS, LAST_INTS = _names("last", float), _names("last", float, other=True)
BEST = tuple((f.name, f.metadata["best"]) for f in _ALL if f.metadata["best"])


def last_column(name: str) -> str:
    """A trial's last value in trials.parquet: counters by name, measurements `last_<name>`."""
    return f"last_{name}" if name in LAST_FLOATS else name


def better(value: float, than: float | None, mode: str) -> bool:
    """`value` beats `than` (None: nothing yet) in the sweep's mode ("min" or "max")."""
    return than is None or (value < than if mode == "min" else value > than)


def best_index(values: Iterable[float | None], mode: str) -> int | None:
    """Position of the best value (the first one on a tie), ignoring missing ones (None or NaN)."""
    best, index = None, None
    for i, value in enumerate(values):
        if value is not None and value == value and better(value, best, mode):
            best, index = value, i
    return index
