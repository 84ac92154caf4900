"""Per-trial loss curves in bounded memory: at most `points` buckets per epoch.

Every report carries the true loss of each micro-batch since the previous report. Keeping
them all grows without bound (1,600 batches x 50 epochs x 8 trials is 640,000 numbers)
and rebuilding a report from them on every write is quadratic. Here each batch is folded
into a bucket of consecutive micro-batches (count, mean, min, max, last) as it arrives, so
a result costs O(batches in it) and a trial holds at most `points x epochs` buckets.

The bucket layout is a function of the micro-batch indices alone, never of how the
batches were split across reports: every report states the epoch size, which fixes the
width, ceil(epoch_batches / points), up front.

Retries replay batches: a worker resumed from an epoch-end checkpoint sends that epoch
again from its first batch, and those replayed updates are the ones that count, so the
epoch (and everything after it) is dropped and rebuilt. Any other overlap is a duplicate
and the copy seen first is kept. No batch is ever counted twice.

Pure Python on purpose: the aggregator, the restore path and the tests use it without Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from hlbd_ray.contract import EPOCH_FLOATS, EPOCH_INTS

MODULES_KEY = "val_modules"   # the report's per-module validation, kept per epoch
# An epoch's checkpoint (TuneKeys.checkpoint_path) as epochs.parquet names it: the
# driver's own record of it, so the best epoch's checkpoint never depends on Tune's
# result files (a driver killed mid-upload leaves a progress.csv without that column).
CHECKPOINT_KEY = "checkpoint"

INF = math.inf


def finite(value: Any) -> float | None:
    """The value as a float, or None when missing or not finite: never NaN downstream."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if -INF < x < INF else None


def path_or_none(value: Any) -> str | None:
    """A checkpoint path as a result carries it, or None (results dataframes hold NaN for
    a missing one)."""
    return value if isinstance(value, str) else None


def as_int(value: Any, default: int | None = 0) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


class Bucket:
    """Consecutive micro-batches [micro_batch_first, micro_batch_last] folded into a few
    statistics (global micro-batch indices, not optimizer steps)."""

    __slots__ = ("index", "micro_batch_first", "micro_batch_last", "count", "nonfinite", "sum",
                 "lo", "hi", "last")

    def __init__(self, index: int, first: int) -> None:
        self.index = index
        self.micro_batch_first = self.micro_batch_last = first
        self.count = self.nonfinite = 0
        self.sum = 0.0
        # lo/hi start at +/-inf so the hot loop needs no None checks; `min`/`max` and
        # `row` turn an empty bucket's into None.
        self.lo, self.hi = INF, -INF
        self.last: float | None = None

    @property
    def min(self) -> float | None:
        return self.lo if self.count else None

    @property
    def max(self) -> float | None:
        return self.hi if self.count else None

    @property
    def mean(self) -> float | None:
        if not self.count:
            return None
        m = self.sum / self.count
        return m if -INF < m < INF else None

    def row(self) -> tuple:
        """Values in BUCKET_FIELDS order."""
        return (self.index, self.micro_batch_first, self.micro_batch_last, self.count,
                self.nonfinite, self.mean, self.min, self.max, self.last, self.sum)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Bucket:
        b = cls(int(row["bucket"]), int(row["micro_batch_first"]))
        b.micro_batch_last = int(row["micro_batch_last"])
        b.count, b.nonfinite = int(row["count"]), int(row["nonfinite"])
        if b.count:
            # The exact sum keeps a resumed bucket's mean identical to an uninterrupted one.
            b.sum, b.lo, b.hi, b.last = float(row["sum"]), float(row["min"]), float(row["max"]), row["last"]
        return b


BUCKET_FIELDS = ("bucket", "micro_batch_first", "micro_batch_last", "count", "nonfinite", "mean",
                 "min", "max", "last", "sum")


class EpochCurve:
    """The buckets of one epoch of one trial."""

    __slots__ = ("epoch", "epoch_batches", "width", "first", "next", "buckets")

    def __init__(self, epoch: int, epoch_batches: int, points: int) -> None:
        self.epoch = epoch
        self.epoch_batches = epoch_batches
        self.width = max(1, -(-epoch_batches // points))
        self.first = epoch * epoch_batches  # global index of the epoch's first batch
        self.next = self.first              # every index below this one has been seen
        self.buckets: list[Bucket] = []

    def extend(self, start: int, losses: list) -> int:
        """Fold consecutive batches starting at global index `start`; returns how many
        were new. Indices already seen are dropped (the first copy wins)."""
        skip = self.next - start
        if skip >= len(losses):
            return 0
        if skip > 0:
            losses, start = losses[skip:], self.next
        first, width, buckets = self.first, self.width, self.buckets
        # Without a bucket yet, a placeholder at index -1 (never stored): every real
        # index is >= 0, so the first batch replaces it and the hot loop needs no None check.
        cur = buckets[-1] if buckets else Bucket(-1, start)
        cur_index = cur.index
        index = start
        for x in losses:
            b = (index - first) // width
            if b != cur_index:
                cur = Bucket(b, index)
                buckets.append(cur)
                cur_index = b
            cur.micro_batch_last = index
            if x is not None and -INF < x < INF:
                cur.count += 1
                cur.sum += x
                if x < cur.lo:
                    cur.lo = x
                if x > cur.hi:
                    cur.hi = x
                cur.last = x
            else:
                cur.nonfinite += 1
            index += 1
        self.next = index
        return len(losses)

    def accepted(self) -> int:
        return sum(b.count + b.nonfinite for b in self.buckets)

    def state(self) -> tuple:
        return (self.epoch, self.epoch_batches, self.next, [b.row() for b in self.buckets])

    @classmethod
    def from_state(cls, state: tuple, points: int) -> EpochCurve:
        epoch, epoch_batches, nxt, rows = state
        curve = cls(epoch, epoch_batches, points)
        curve.next = nxt
        curve.buckets = [Bucket.from_row(dict(zip(BUCKET_FIELDS, r))) for r in rows]
        return curve


class TrialCurves:
    """All epochs of one trial: bucketed batch losses plus one summary per closed epoch."""

    def __init__(self, trial_id: str, points: int) -> None:
        self.trial_id = trial_id
        self.points = points
        self.epochs: dict[int, EpochCurve] = {}
        self.summaries: dict[int, dict[str, Any]] = {}

    def ingest(self, report: Mapping[str, Any]) -> tuple[bool, bool]:
        """Fold one report in; returns (curves changed, epoch summaries changed)."""
        losses = report["batch_losses"]
        start, epoch_batches = int(report["batch_start"]), int(report["epoch_batches"])
        curves_changed = summaries_changed = False
        if losses:
            # A report starting an epoch is a resume point: that epoch is sent again.
            if start % epoch_batches == 0 and self._truncate(start // epoch_batches):
                curves_changed = summaries_changed = True
            curves_changed |= self._fold(start, losses, epoch_batches)
        if report["epoch_end"]:
            epoch = int(report["epoch"])
            summary = summary_of(report)
            # A resumed run repeats its last epoch's report without the checkpoint it resumed
            # from: the first report's checkpoint stays the epoch's.
            summary[CHECKPOINT_KEY] = summary[CHECKPOINT_KEY] or self.summaries.get(epoch, {}).get(CHECKPOINT_KEY)
            self.summaries[epoch] = summary
            summaries_changed = True
        return curves_changed, summaries_changed

    def _truncate(self, epoch: int) -> bool:
        """Drop `epoch` and every later one: a retry is about to send them again."""
        doomed = [e for e in self.epochs if e >= epoch]
        gone = [e for e in self.summaries if e >= epoch]
        for e in doomed:
            del self.epochs[e]
        for e in gone:
            del self.summaries[e]
        return bool(doomed or gone)

    def _fold(self, start: int, losses: list, epoch_batches: int) -> bool:
        changed = False
        offset = 0
        while offset < len(losses):
            index = start + offset
            # Global index = epoch * epoch_batches + position: a report that crosses an
            # epoch boundary is split there.
            e = index // epoch_batches
            n = min(len(losses) - offset, (e + 1) * epoch_batches - index)
            curve = self.epochs.get(e)
            if curve is None:
                curve = self.epochs[e] = EpochCurve(e, epoch_batches, self.points)
            changed |= bool(curve.extend(index, losses[offset:offset + n]))
            offset += n
        return changed

    def accepted(self) -> int:
        """Batches folded in so far (finite or not); replays and duplicates excluded."""
        return sum(c.accepted() for c in self.epochs.values())

    def sorted_epochs(self) -> list[EpochCurve]:
        return [self.epochs[e] for e in sorted(self.epochs)]

    def state(self) -> dict[str, Any]:
        return {"epochs": [c.state() for c in self.sorted_epochs()],
                "summaries": {e: dict(s) for e, s in self.summaries.items()}}

    def load(self, epochs: Iterable[EpochCurve], summaries: Mapping[int, Mapping]) -> None:
        self.epochs = {curve.epoch: curve for curve in epochs}
        self.summaries = {int(e): dict(s) for e, s in summaries.items()}


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """The epoch-end values worth keeping per epoch (the contract's epoch columns),
    non-finite ones as None."""
    out: dict[str, Any] = {k: finite(report.get(k)) for k in EPOCH_FLOATS}
    out.update({k: as_int(report.get(k), None) for k in EPOCH_INTS})
    out[MODULES_KEY] = {module: {k: finite(v) for k, v in values.items()}
                        for module, values in (report.get(MODULES_KEY) or {}).items()}
    out[CHECKPOINT_KEY] = path_or_none(report.get("checkpoint_path"))
    return out


class CurveStore:
    """Curves of every trial of a sweep."""

    def __init__(self, points_per_epoch: int) -> None:
        if points_per_epoch < 1:
            raise ValueError(f"points_per_epoch must be >= 1, got {points_per_epoch}")
        self.points = points_per_epoch
        self.trials: dict[str, TrialCurves] = {}

    def trial(self, trial_id: str) -> TrialCurves:
        curves = self.trials.get(trial_id)
        if curves is None:
            curves = self.trials[trial_id] = TrialCurves(trial_id, self.points)
        return curves

    def ingest(self, trial_id: str, report: Mapping[str, Any]) -> tuple[bool, bool]:
        return self.trial(trial_id).ingest(report)

    def state(self) -> dict[str, Any]:
        return {"points": self.points,
                "trials": {tid: t.state() for tid, t in self.trials.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CurveStore:
        store = cls(int(state["points"]))
        for tid, trial_state in state["trials"].items():
            epochs = [EpochCurve.from_state(s, store.points) for s in trial_state["epochs"]]
            store.trial(tid).load(epochs, trial_state["summaries"])
        return store

    def trial_from_rows(self, trial_id: str, bucket_rows: Iterable[Mapping[str, Any]],
                        summary_rows: Iterable[Mapping[str, Any]]) -> TrialCurves:
        """A trial rebuilt from written rows (curves/epochs tables), not yet adopted."""
        epochs: dict[int, EpochCurve] = {}
        for row in sorted(bucket_rows, key=lambda r: (r["epoch"], r["bucket"])):
            e = int(row["epoch"])
            curve = epochs.get(e)
            if curve is None:
                curve = epochs[e] = EpochCurve(e, int(row["epoch_batches"]), self.points)
            curve.buckets.append(Bucket.from_row(row))
            curve.next = int(row["micro_batch_last"]) + 1
        summaries = {int(r["epoch"]): {k: r.get(k) for k in EPOCH_FLOATS + EPOCH_INTS + (MODULES_KEY, CHECKPOINT_KEY)}
                     for r in summary_rows}
        trial = TrialCurves(trial_id, self.points)
        trial.load(epochs.values(), summaries)
        return trial

    def adopt(self, trial: TrialCurves) -> None:
        self.trials[trial.trial_id] = trial
