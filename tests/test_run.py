"""jobs/train.py on a real local Ray: two DDP workers, the run folder, resume, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hlbd_ray.config import load_config
from hlbd_ray.trainer import storage_join

from .conftest import REPO, run_job

SMOKE = str(REPO / "conf" / "smoke.yaml")


def test_storage_paths_join_for_folders_and_uris():
    assert storage_join("/data/runs", "sweep", "train") == "/data/runs/sweep/train"
    assert storage_join("s3://bucket/runs/", "sweep") == "s3://bucket/runs/sweep"
    # pyarrow's filesystem options stay last: the parts join the path, not the query.
    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage_join(f"s3://bucket/runs{query}", "sweep", "train") == f"s3://bucket/runs/sweep/train{query}"


def test_checkpoint_paths_ray_reports_become_uris_again():
    from hlbd_ray.storage import storage_uri

    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage_uri(f"s3://bucket/runs{query}", "bucket/runs/x/checkpoint_1") == \
        f"s3://bucket/runs/x/checkpoint_1{query}"
    assert storage_uri("/data/runs", "/data/runs/x/checkpoint_1") == "/data/runs/x/checkpoint_1"
    assert storage_uri("gs://b/r", None) is None


@pytest.mark.slow
def test_two_worker_ddp_run_writes_its_folder_and_resumes(tmp_path):
    args = ["--config", SMOKE, f"output_dir={tmp_path}", "name=ddp", "cluster.num_cpus=2",
            "train.num_workers=2", "train.epochs=2"]
    result = run_job("train.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    cfg = load_config(run_dir / "config.yaml")                     # the resolved config
    assert cfg.train.num_workers == 2 and cfg.output_dir == str(tmp_path)
    # max_len "auto" became the data's length, in the config, the report and the checkpoint.
    report = json.loads((run_dir / "dataset_report.json").read_text())
    assert cfg.train.max_len == report["max_len"] == 56 and report["split"]["val_with_train_twin"] == 0
    vocab = json.loads((run_dir / "vocab.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({tuple(sorted(r)) for r in records}) == 1             # same keys every report
    ends = [r for r in records if r["epoch_end"]]
    assert [r["epochs_done"] for r in ends] == [1, 2]
    assert all(r["checkpoint_path"] for r in ends)
    # Two workers each take half of every epoch's batches.
    assert records[-1]["batches"] == 2 * records[-1]["epoch_batches"]
    state = torch.load(f"{ends[-1]['checkpoint_path']}/state.pt", weights_only=True)
    assert state["tokenizer"] == vocab and state["progress"]["epoch"] == 2
    assert state["config"]["train"]["max_len"] == 56
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in Path(ends[-1]["checkpoint_path"]).iterdir()}
    assert "run summary" in result.stdout and "val_loss" in result.stdout
    # Ray Train's own INFO line per report, with every metric, is muted on the workers.
    assert "Reporting training result" not in result.stdout + result.stderr

    # The same command again resumes from the last checkpoint: nothing left to train.
    again = run_job("train.py", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    records_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    replay = json.loads(records_after[-1])
    assert len(records_after) == len(records) + 1 and replay["epochs_done"] == 2
    assert replay["val_loss"] == ends[-1]["val_loss"] and replay["batch_losses"] == []


def test_preflight_resolves_max_len_and_paths_and_writes_the_data_report(tmp_path, capsys, hlbd_dir):
    from hlbd_ray.trainer import preflight

    cfg = load_config(SMOKE, [f"data.paths=[{hlbd_dir / 'HLBD_Full_V2.json'}]", "train.max_len=auto",
                              f"output_dir={tmp_path / 'out'}", "name=run1"])
    resolved, data = preflight(cfg)
    out = capsys.readouterr().out
    # auto: the longest sequence (232 tokens) rounded up to a multiple of 8, cutting nothing.
    assert resolved.train.max_len == data.dataset_stats["max_len"] == 232
    assert "max_len 232 cuts 0 answers" in out and "\nfull " in out
    assert resolved.output_dir == str(tmp_path / "out") and resolved.storage_path == resolved.output_dir
    report = json.loads((tmp_path / "out" / "run1" / "dataset_report.json").read_text())
    assert report["format"] == "hlbd_ray.dataset_report/1" and report["max_len"] == 232
    assert f"data report: {tmp_path / 'out' / 'run1' / 'dataset_report.json'}" in out


def test_preflight_trains_on_cut_answers_only_when_allowed(tmp_path, capsys, hlbd_dir):
    from hlbd_ray.trainer import preflight

    cfg = load_config(SMOKE, ["data.paths=[hlbd:full]", "train.max_len=150",
                              "train.allow_truncation=true", f"output_dir={tmp_path / 'out'}"])
    resolved, data = preflight(cfg)
    stats = data.dataset_stats
    assert stats["files"][0]["path"] == str(hlbd_dir / "HLBD_Full_V2.json")
    cut = stats["truncated_train"] + stats["truncated_val"]
    assert resolved.train.max_len == 150 and cut == int(data.train.truncated.sum() + data.val.truncated.sum())
    assert cut > 0.01 * 5000 and f"max_len 150 cuts {cut} answers" in capsys.readouterr().out


class ListQueue:
    """The get() of ray.util.queue.Queue over a thread-safe list (the writer's side only)."""

    def __init__(self) -> None:
        import queue

        self.items = queue.Queue()

    def put(self, item) -> None:
        self.items.put(item)

    def get(self, timeout: float):
        import queue

        from ray.util.queue import Empty
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            raise Empty from None


def test_the_driver_writes_every_queued_report_in_order_before_it_returns(tmp_path):
    import threading

    from hlbd_ray.run import MetricsWriter

    path, reports = tmp_path / "metrics.jsonl", ListQueue()
    path.write_text('{"step": 0}\n')                    # a resumed run appends after its lines
    with MetricsWriter(path, reports, poll_s=0.05):
        producer = threading.Thread(target=lambda: [reports.put({"step": i}) for i in range(1, 201)])
        producer.start()
        producer.join()                                  # fit() returns after its last put
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(201))
    with pytest.raises(RuntimeError, match="writing .* failed"):
        with MetricsWriter(path, reports, poll_s=0.05):
            reports.put({"loss": float("nan")})          # allow_nan=False: never a silent NaN
