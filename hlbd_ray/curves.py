"""Per-trial loss curves in bounded memory: at most `points` buckets per epoch.

Every report carries the true loss of each micro-batch since the previous report. Keeping
them all grows without bound (1,600 batches x 50 epochs x 8 trials is 640,000 numbers)
and rebuilding a report from them on every write is quadratic. Here each batch is folded
into a bucket of consecutive batches (count, mean, min, max, last) as it arrives, so a
result costs O(batches in it) and a trial holds at most `points x epochs` buckets.

The bucket layout is a function of the batch indices alone, never of how the batches were
split across reports: a known epoch size fixes the width up front, and an unknown one
starts at width 1 and doubles (merging neighbour pairs) whenever the next batch would
open bucket number `points`.

Retries replay batches: a worker resumed from an epoch-end checkpoint sends that epoch
again from its first batch, and those replayed updates are the ones that count, so the
epoch (and everything after it) is dropped and rebuilt. Any other overlap is a duplicate
and the copy seen first is kept. No batch is ever counted twice.

Pure Python on purpose: the aggregator, the restore path and the tests use it without Ray.
"""

from __future__ import annotations

import math
from itertools import count
from typing import Any, Iterable, Iterator, Mapping

INF = math.inf
_PLAIN = {float, type(None)}

# Per-epoch values taken from the report that closes an epoch.
SUMMARY_KEYS = ("epoch_loss", "val_loss", "val_ppl", "val_acc", "val_exact", "lr",
                "tokens_per_s", "time_total_s", "grad_norm")
SUMMARY_INT_KEYS = ("val_step", "step", "batch")


def finite(value: Any) -> float | None:
    """The value as a float, or None when missing or not finite: never NaN downstream."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if -INF < x < INF else None


def as_int(value: Any, default: int | None = 0) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


class Bucket:
    """Consecutive batches [step_first, step_last] folded into a few statistics."""

    __slots__ = ("index", "step_first", "step_last", "count", "nonfinite", "sum", "lo", "hi",
                 "last")

    def __init__(self, index: int, step: int) -> None:
        self.index = index
        self.step_first = self.step_last = step
        self.count = self.nonfinite = 0
        self.sum = 0.0
        # lo/hi start at +/-inf so the hot loop needs no None checks; `min`/`max` and
        # `row` turn an empty bucket's into None.
        self.lo, self.hi = INF, -INF
        self.last: float | None = None

    def absorb(self, later: "Bucket") -> None:
        """Merge the bucket that directly follows this one into it."""
        self.step_last = later.step_last
        self.count += later.count
        self.nonfinite += later.nonfinite
        self.sum += later.sum
        self.lo = min(self.lo, later.lo)
        self.hi = max(self.hi, later.hi)
        if later.last is not None:
            self.last = later.last

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
        """(index, step_first, step_last, count, nonfinite, mean, min, max, last, sum)."""
        return (self.index, self.step_first, self.step_last, self.count, self.nonfinite,
                self.mean, self.min, self.max, self.last, self.sum)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Bucket":
        b = cls(int(row["bucket"]), int(row["step_first"]))
        b.step_last = int(row["step_last"])
        b.count, b.nonfinite = int(row["count"]), int(row["nonfinite"])
        if b.count:
            # The exact sum keeps a resumed bucket's mean identical to an uninterrupted one.
            total = row.get("sum")
            b.sum = float(total) if total is not None else float(row["mean"]) * b.count
            b.lo, b.hi, b.last = float(row["min"]), float(row["max"]), row["last"]
        return b


BUCKET_FIELDS = ("bucket", "step_first", "step_last", "count", "nonfinite", "mean", "min",
                 "max", "last", "sum")


class EpochCurve:
    """The buckets of one epoch of one trial."""

    __slots__ = ("epoch", "epoch_batches", "width", "first", "next", "buckets", "rev")

    def __init__(self, epoch: int, epoch_batches: int, first: int, points: int) -> None:
        self.epoch = epoch
        self.epoch_batches = max(0, epoch_batches)
        self.width = -(-epoch_batches // points) if epoch_batches > 0 else 1
        self.first = first            # global index of the epoch's first batch
        self.next = first             # every index below this one has been seen
        self.buckets: list[Bucket] = []
        self.rev = 0                  # bumped on change: lets writers cache what did not

    def extend(self, start: int, losses: list, points: int) -> int:
        """Fold consecutive batches starting at global index `start`; returns how many
        were new. Indices already seen are dropped (the first copy wins)."""
        skip = self.next - start
        if skip >= len(losses):
            return 0
        if skip > 0:
            losses, start = losses[skip:], self.next
        first, width, buckets = self.first, self.width, self.buckets
        cur = buckets[-1] if buckets else None
        cur_index = cur.index if cur is not None else -1
        step = start
        for x in losses:
            b = (step - first) // width
            if b != cur_index:
                if b >= points:
                    b = self._make_room(step, points)
                    width = self.width
                    cur = buckets[-1] if buckets else None
                if cur is None or b != cur.index:
                    cur = Bucket(b, step)
                    buckets.append(cur)
                cur_index = b
            cur.step_last = step
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
            step += 1
        self.next = step
        return len(losses)

    def _make_room(self, step: int, points: int) -> int:
        """Bucket index for `step` once the layout fits the bound again."""
        if self.epoch_batches > 0:
            # A known width already fits the epoch; a batch past its declared size
            # joins the last bucket rather than breaking the bound.
            return points - 1
        while (step - self.first) // self.width >= points:
            self._halve()
        return (step - self.first) // self.width

    def _halve(self) -> None:
        """Double the width: neighbour pairs (2k, 2k+1) merge into bucket k."""
        merged: list[Bucket] = []
        for bucket in self.buckets:
            bucket.index //= 2
            if merged and merged[-1].index == bucket.index:
                merged[-1].absorb(bucket)
            else:
                merged.append(bucket)
        self.buckets[:] = merged   # in place: `extend` holds a reference to the list
        self.width *= 2

    def accepted(self) -> int:
        return sum(b.count + b.nonfinite for b in self.buckets)

    def state(self) -> tuple:
        return (self.epoch, self.epoch_batches, self.width, self.first, self.next,
                [b.row() for b in self.buckets])

    @classmethod
    def from_state(cls, state: tuple, points: int) -> "EpochCurve":
        epoch, epoch_batches, width, first, nxt, rows = state
        curve = cls(epoch, epoch_batches, first, points)
        curve.width, curve.next = width, nxt
        curve.buckets = [Bucket.from_row(dict(zip(BUCKET_FIELDS, r))) for r in rows]
        return curve


class TrialCurves:
    """All epochs of one trial: bucketed batch losses plus one summary per closed epoch."""

    def __init__(self, trial_id: str, points: int, revs: Iterator[int]) -> None:
        self.trial_id = trial_id
        self.points = points
        self._revs = revs
        self.epochs: dict[int, EpochCurve] = {}
        self.summaries: dict[int, dict[str, Any]] = {}
        self.summary_rev = 0          # bumped whenever `summaries` changes

    def ingest(self, report: Mapping[str, Any]) -> tuple[bool, bool]:
        """Fold one report in; returns (curves changed, epoch summaries changed)."""
        losses = report.get("batch_losses") or []
        if not isinstance(losses, list) or not {type(x) for x in losses} <= _PLAIN:
            # Rare (ints, numpy scalars, strings, bools): normalise once so the hot loop
            # can assume float or None.
            losses = [finite(x) for x in losses]
        epoch = as_int(report.get("epoch"), 0) or 0
        epoch_batches = as_int(report.get("epoch_batches"), 0) or 0
        start = as_int(report.get("batch_start"), None)
        if start is None:
            start = (as_int(report.get("batch"), 0) or 0) - len(losses)
        curves_changed = summaries_changed = False
        if losses:
            replayed = self._replayed_epoch(start, epoch, epoch_batches)
            if replayed is not None and self._truncate(replayed):
                curves_changed = summaries_changed = True
            curves_changed |= self._fold(start, losses, epoch, epoch_batches)
        if report.get("epoch_end"):
            self.summaries[epoch] = summary_of(report)
            summaries_changed = True
        if summaries_changed:
            self.summary_rev = next(self._revs)
        return curves_changed, summaries_changed

    def _replayed_epoch(self, start: int, epoch: int, epoch_batches: int) -> int | None:
        """The epoch whose first batch is `start` (a resume point), if there is one."""
        if epoch_batches > 0:
            return start // epoch_batches if start % epoch_batches == 0 else None
        curve = self.epochs.get(epoch)
        return epoch if curve is not None and curve.first == start else None

    def _truncate(self, epoch: int) -> bool:
        """Drop `epoch` and every later one: a retry is about to send them again."""
        doomed = [e for e in self.epochs if e >= epoch]
        gone = [e for e in self.summaries if e >= epoch]
        for e in doomed:
            del self.epochs[e]
        for e in gone:
            del self.summaries[e]
        return bool(doomed or gone)

    def _fold(self, start: int, losses: list, epoch: int, epoch_batches: int) -> bool:
        changed = False
        offset = 0
        while offset < len(losses):
            step = start + offset
            if epoch_batches > 0:
                # Global index = epoch * epoch_batches + position: a report that crosses
                # an epoch boundary is split there.
                e = step // epoch_batches
                n = min(len(losses) - offset, (e + 1) * epoch_batches - step)
            else:
                e, n = epoch, len(losses) - offset
            curve = self.epochs.get(e)
            if curve is None:
                first = e * epoch_batches if epoch_batches > 0 else step
                curve = self.epochs[e] = EpochCurve(e, epoch_batches, first, self.points)
            if step >= curve.first and curve.extend(step, losses[offset:offset + n], self.points):
                curve.rev = next(self._revs)
                changed = True
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
        self.epochs = {}
        for curve in epochs:
            curve.rev = next(self._revs)
            self.epochs[curve.epoch] = curve
        self.summaries = {int(e): dict(s) for e, s in summaries.items()}
        self.summary_rev = next(self._revs)


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """The epoch-end values worth keeping per epoch, non-finite ones as None."""
    out: dict[str, Any] = {k: finite(report.get(k)) for k in SUMMARY_KEYS}
    out.update({k: as_int(report.get(k), None) for k in SUMMARY_INT_KEYS})
    return out


class CurveStore:
    """Curves of every trial of a sweep."""

    def __init__(self, points_per_epoch: int) -> None:
        if points_per_epoch < 1:
            raise ValueError(f"points_per_epoch must be >= 1, got {points_per_epoch}")
        self.points = points_per_epoch
        # One counter for the whole store: a rebuilt epoch never reuses an old revision,
        # so a cache keyed by revision cannot serve stale data.
        self._revs = count(1)
        self.trials: dict[str, TrialCurves] = {}

    def trial(self, trial_id: str) -> TrialCurves:
        curves = self.trials.get(trial_id)
        if curves is None:
            curves = self.trials[trial_id] = TrialCurves(trial_id, self.points, self._revs)
        return curves

    def ingest(self, trial_id: str, report: Mapping[str, Any]) -> tuple[bool, bool]:
        return self.trial(trial_id).ingest(report)

    def state(self) -> dict[str, Any]:
        return {"points": self.points,
                "trials": {tid: t.state() for tid, t in self.trials.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "CurveStore":
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
                curve = epochs[e] = EpochCurve(e, int(row["epoch_batches"]),
                                               int(row["step_first"]), self.points)
                curve.width = int(row["width"])
                if curve.epoch_batches > 0:
                    curve.first = e * curve.epoch_batches
            curve.buckets.append(Bucket.from_row(row))
            curve.next = int(row["step_last"]) + 1
        summaries = {int(r["epoch"]): {k: r.get(k) for k in SUMMARY_KEYS + SUMMARY_INT_KEYS}
                     for r in summary_rows}
        trial = TrialCurves(trial_id, self.points, self._revs)
        trial.load(epochs.values(), summaries)
        return trial

    def adopt(self, trial: TrialCurves) -> None:
        self.trials[trial.trial_id] = trial
