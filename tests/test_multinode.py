"""A real multi-node Ray cluster on this host: a head with no CPUs for trials and two
1-CPU worker nodes, each a raylet of its own (`ray.cluster_utils.Cluster`). The jobs
attach to it with `cluster.address`, as they would to a cluster of machines."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from bench.bench_cluster import local_cluster

from .conftest import REPO, run_job

SMOKE = str(REPO / "conf" / "smoke.yaml")



@pytest.fixture
def cluster():
    # A head with no CPUs and two 1-CPU worker nodes (bench/two_nodes.py's layout).
    with local_cluster(0, (1, 1)) as c:
        yield c


def train_workers_by_job(address: str) -> dict[str, list[str]]:
    """Job id -> the node ids its Ray Train workers ran on (dead actors included)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")],
                         detail=True, limit=1000, raise_on_missing_output=False)
    nodes = defaultdict(list)
    for actor in actors:
        nodes[actor.job_id].append(actor.node_id)
    return nodes


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [loss for r in records for loss in r["batch_losses"]]


@pytest.mark.slow
def test_a_sweep_and_a_spread_run_on_a_multi_node_cluster(tmp_path, cluster):
    import pyarrow.parquet as pq

    head_id = cluster.head_node.node_id
    attach = f"cluster.address={cluster.address}"
    # The sweep: two trials at once, one per worker node; precision auto probed once.
    sweep = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}", attach,
                    "sweep.num_samples=2", "train.epochs=2", "train.precision=auto", timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    exp = tmp_path / "smoke"
    trials = pq.read_table(exp / "report" / "trials.parquet").to_pylist()
    assert len(trials) == 2 and all(t["epochs_done"] >= 1 and t["best_val_loss"] for t in trials)
    assert len({t["precision"] for t in trials}) == 1 and trials[0]["precision"] in ("bf16", "fp32")
    assert f"precision: auto is {trials[0]['precision']}" in sweep.stdout
    epochs = pq.read_table(exp / "report" / "epochs.parquet").to_pylist()
    assert sorted((e["trial_id"], e["epoch"]) for e in epochs) == sorted(
        (t["trial_id"], e) for t in trials for e in range(t["epochs_done"]))
    best = json.loads((exp / "best.json").read_text())
    assert Path(best["checkpoint"]).is_dir() and (Path(best["checkpoint"]) / "state.pt").is_file()
    seen = train_workers_by_job(cluster.address)
    # A worker actor Train created and gave up before it was placed has no node (None).
    sweep_nodes = {n for ns in seen.values() for n in ns} - {None}
    assert len(sweep_nodes) == 2 and head_id not in sweep_nodes   # trials ran on the worker nodes

    # One run of two workers, one on each worker node (no node holds both) ...
    run = ["--config", SMOKE, attach, "train.num_workers=2", "train.epochs=1",
           "train.precision=fp32", f"output_dir={tmp_path}"]
    spread = run_job("train.py", *run, "name=spread", timeout=300)
    assert spread.returncode == 0, spread.stderr[-3000:]
    by_job = train_workers_by_job(cluster.address)
    (spread_nodes,) = [ns for job, ns in by_job.items() if job not in seen]
    assert len(set(spread_nodes)) == 2 and head_id not in spread_nodes
    # ... whose metrics.jsonl the driver wrote whole: every report, every batch once.
    records = [json.loads(line) for line in (tmp_path / "spread" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch_end"] and records[-1]["batches"] == records[-1]["epoch_batches"]   # 1 epoch
    assert [r["batch_start"] for r in records[1:]] == [r["batches"] for r in records[:-1]]

    # A worker group larger than any node set is refused up front, in one line.
    too_big = run_job("train.py", "--config", SMOKE, attach, "train.cpus_per_worker=2",
                      f"output_dir={tmp_path}", "name=big", timeout=120)
    assert too_big.returncode == 2 and "cannot be placed" in too_big.stderr
    assert "Traceback" not in too_big.stderr

    # The same run on one node of two CPUs: the same loss curve.
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    packed = run_job("train.py", *run, "name=packed", timeout=300)
    assert packed.returncode == 0, packed.stderr[-3000:]
    (packed_nodes,) = [ns for job, ns in train_workers_by_job(cluster.address).items()
                       if job not in by_job]
    assert len(packed_nodes) == 2 and len(set(packed_nodes)) == 1
    assert losses(tmp_path / "packed") == pytest.approx(losses(tmp_path / "spread"), abs=1e-5)
    assert len(losses(tmp_path / "spread")) == records[-1]["epoch_batches"]
