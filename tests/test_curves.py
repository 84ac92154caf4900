"""Bounded loss curves: the bound, exact statistics, split invariance, replays."""

from __future__ import annotations

import math
import random

import pytest

from hlbd_ray.curves import CurveStore, TrialCurves


def report(start: int, losses: list, epoch: int, epoch_batches: int, **extra) -> dict:
    return {"batch_start": start, "batch_losses": losses, "epoch": epoch, "epoch_end": False,
            "epoch_batches": epoch_batches, "batches": start + len(losses), **extra}


def feed(store: CurveStore, tid: str, losses: list, epoch_batches: int,
         sizes: list[int] | None = None) -> None:
    """Send `losses` (global indices 0..n-1) in reports of the given sizes, cycling."""
    pos, k = 0, 0
    while pos < len(losses):
        n = sizes[k % len(sizes)] if sizes else 20
        k += 1
        # Reports never cross an epoch end: the training loop reports there.
        n = min(n, (pos // epoch_batches + 1) * epoch_batches - pos)
        epoch = pos // epoch_batches
        store.ingest(tid, report(pos, losses[pos:pos + n], epoch, epoch_batches))
        pos += n


def rows(trial: TrialCurves) -> list[tuple]:
    return [(c.epoch, c.width) + b.row() for c in trial.sorted_epochs() for b in c.buckets]


def stream(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [rng.uniform(1.0, 5.0) for _ in range(n)]


@pytest.mark.parametrize("epoch_batches", [1, 7, 99, 100, 101, 1600, 12345])
@pytest.mark.parametrize("points", [1, 3, 100])
def test_bound_with_known_epoch_size(epoch_batches: int, points: int) -> None:
    store = CurveStore(points)
    feed(store, "t", stream(3 * epoch_batches), epoch_batches, sizes=[17, 3, 40])
    trial = store.trials["t"]
    assert sorted(trial.epochs) == [0, 1, 2]
    for curve in trial.epochs.values():
        assert len(curve.buckets) <= points
        assert curve.width == math.ceil(epoch_batches / points)
        assert curve.accepted() == epoch_batches


@pytest.mark.parametrize("epoch_batches", [50, 777, 1600])
def test_bucket_statistics_equal_those_of_the_raw_batches(epoch_batches: int) -> None:
    losses = stream(3200, seed=3)
    store = CurveStore(10)
    feed(store, "t", losses, epoch_batches, sizes=[13, 29])
    covered = 0
    for curve in store.trials["t"].sorted_epochs():
        for b in curve.buckets:
            raw = losses[b.micro_batch_first:b.micro_batch_last + 1]
            covered += len(raw)
            assert (b.count, b.nonfinite) == (len(raw), 0)
            assert (b.min, b.max, b.last) == (min(raw), max(raw), raw[-1])
            assert b.mean == pytest.approx(sum(raw) / len(raw), rel=1e-12)
    assert covered == len(losses)


@pytest.mark.parametrize("epoch_batches", [64, 1000, 3000])
def test_splitting_across_reports_gives_identical_buckets(epoch_batches: int) -> None:
    losses = stream(3000, seed=5)
    results = []
    for seed in range(4):
        rng = random.Random(seed)
        sizes = [rng.randint(1, 60) for _ in range(50)]
        store = CurveStore(100)
        feed(store, "t", losses, epoch_batches, sizes=sizes)
        results.append(rows(store.trials["t"]))
    # Exact equality, sums included: the fold order never depends on the split.
    assert all(r == results[0] for r in results)


def test_a_single_spike_is_preserved_in_max() -> None:
    losses = [2.0] * 1600
    losses[777] = 1e4
    store = CurveStore(100)
    feed(store, "t", losses, 1600)
    spiked = [b for b in store.trials["t"].epochs[0].buckets if b.max == 1e4]
    assert len(spiked) == 1 and spiked[0].micro_batch_first <= 777 <= spiked[0].micro_batch_last
    assert spiked[0].mean == pytest.approx((2.0 * 15 + 1e4) / 16)


def test_non_finite_batches_are_counted_not_averaged() -> None:
    store = CurveStore(2)
    losses = [1.0, None, float("nan"), 3.0, float("inf"), -float("inf"), None, None]
    feed(store, "t", losses, 8, sizes=[3])
    a, b = store.trials["t"].epochs[0].buckets
    assert (a.count, a.nonfinite, a.mean, a.min, a.max, a.last) == (2, 2, 2.0, 1.0, 3.0, 3.0)
    assert (b.count, b.nonfinite, b.mean, b.min, b.max, b.last) == (0, 4, None, None, None, None)
    assert (b.micro_batch_first, b.micro_batch_last) == (4, 7)
    assert b.row()[5:9] == (None, None, None, None)





def test_replay_from_an_epoch_start_replaces_that_epoch_and_later() -> None:
    eb = 100
    first_try = stream(3 * eb, seed=1)
    retry = stream(3 * eb, seed=2)          # the resumed run's batches differ

    def send(store: CurveStore, losses: list, start: int, stop: int) -> None:
        for pos in range(start, stop, 25):
            n = min(25, stop - pos)
            epoch = pos // eb
            store.ingest("t", report(pos, losses[pos:pos + n], epoch, eb,
                                     epoch_end=(pos + n) % eb == 0, epoch_loss=float(epoch)))

    interrupted = CurveStore(10)
    send(interrupted, first_try, 0, 2 * eb + 60)   # dies 60 batches into epoch 2 ...
    send(interrupted, retry, eb, 3 * eb)           # ... resumes from the end of epoch 0
    expected = CurveStore(10)
    send(expected, first_try, 0, eb)
    send(expected, retry, eb, 3 * eb)
    assert rows(interrupted.trials["t"]) == rows(expected.trials["t"])
    assert interrupted.trials["t"].summaries == expected.trials["t"].summaries
    assert interrupted.trials["t"].accepted() == 3 * eb


def test_replay_from_scratch_drops_everything() -> None:
    store = CurveStore(10)
    feed(store, "t", stream(250, seed=1), 100)
    retry = stream(250, seed=2)
    feed(store, "t", retry, 100)
    expected = CurveStore(10)
    feed(expected, "t", retry, 100)
    assert rows(store.trials["t"]) == rows(expected.trials["t"])


@pytest.mark.parametrize("epoch_batches", [300, 1000])
def test_overlapping_duplicates_keep_the_first_copy(epoch_batches: int) -> None:
    losses = stream(300, seed=4)
    store = CurveStore(10)
    store.ingest("t", report(0, losses[:120], 0, epoch_batches))
    # A re-sent window overlapping the last one, with different (later) values.
    store.ingest("t", report(100, [9.0] * 20 + losses[120:200], 0, epoch_batches))
    store.ingest("t", report(150, [9.0] * 50, 0, epoch_batches))    # fully seen: ignored
    store.ingest("t", report(200, losses[200:], 0, epoch_batches))
    expected = CurveStore(10)
    expected.ingest("t", report(0, losses, 0, epoch_batches))
    assert rows(store.trials["t"]) == rows(expected.trials["t"])
    assert store.trials["t"].accepted() == 300


def test_a_report_crossing_an_epoch_end_is_split_there() -> None:
    losses = stream(30)
    store = CurveStore(5)
    store.ingest("t", report(0, losses, 0, 10))
    assert sorted(store.trials["t"].epochs) == [0, 1, 2]
    assert [c.accepted() for c in store.trials["t"].sorted_epochs()] == [10, 10, 10]


def test_state_round_trip_then_continue_equals_uninterrupted() -> None:
    losses = stream(5000, seed=9)
    for eb in (700, 5000):
        whole = CurveStore(100)
        feed(whole, "t", losses, eb, sizes=[23])
        part = CurveStore(100)
        feed(part, "t", losses[:2345], eb, sizes=[23])
        resumed = CurveStore.from_state(part.state())
        # Continue mid-stream (and re-send a window the first run already had).
        resumed.ingest("t", report(2300, losses[2300:2400], 2300 // eb, eb))
        feed_from(resumed, losses, 2400, eb)
        feed_from(whole, losses, len(losses), eb)
        assert rows(resumed.trials["t"]) == rows(whole.trials["t"])


def feed_from(store: CurveStore, losses: list, start: int, eb: int) -> None:
    pos = start
    while pos < len(losses):
        n = min(23, len(losses) - pos, (pos // eb + 1) * eb - pos)
        store.ingest("t", report(pos, losses[pos:pos + n], pos // eb, eb))
        pos += n


def test_memory_is_bounded_by_points_times_epochs() -> None:
    store = CurveStore(100)
    eb = 20_000
    feed(store, "t", stream(5 * eb), eb, sizes=[400])
    assert sum(len(c.buckets) for c in store.trials["t"].epochs.values()) == 500


def test_epoch_end_reports_store_summaries_with_nulls_for_non_finite() -> None:
    store = CurveStore(10)
    store.ingest("t", report(0, [1.0, 2.0], 0, 2, epoch_end=True, epoch_loss=1.5,
                             val_loss=float("nan"), val_acc=0.5, lr=1e-3, tokens_per_s=10.0,
                             step=1))
    s = store.trials["t"].summaries[0]
    assert (s["epoch_loss"], s["val_loss"], s["val_acc"], s["lr"], s["step"]) == \
        (1.5, None, 0.5, 1e-3, 1)
