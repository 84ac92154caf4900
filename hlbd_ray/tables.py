"""The report's file formats: explicit Arrow schemas (columns from `hlbd_ray.contract`),
one row per trial, and the atomic writers and safe readers of the parquet tables and JSON
documents that `hlbd_ray.report` keeps up to date.

Non-finite numbers never reach a file: they are written as null.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hlbd_ray.contract import BEST, EPOCH_FLOATS, EPOCH_INTS, LAST_FLOATS, LAST_INTS, best_index, last_column
from hlbd_ray.curves import BUCKET_FIELDS, CHECKPOINT_KEY, MODULES_KEY, CurveStore, as_int, finite
from hlbd_ray.files import atomic_write

logger = logging.getLogger(__name__)


SCHEMA_VERSION = 2
REPORT_DIR = "report"
CURVES_FILE, EPOCHS_FILE, TRIALS_FILE = "curves.parquet", "epochs.parquet", "trials.parquet"
MODULES_FILE = "modules.parquet"
JSON_FILE = "experiment_report.json"

_I, _F, STRING = pa.int64(), pa.float64(), pa.string()
_BUCKET_TYPES = {"mean": _F, "min": _F, "max": _F, "last": _F,
                 # The exact running sum: a bucket resumed from this file continues bit for bit.
                 "sum": _F}
CURVES_SCHEMA = pa.schema(
    [("trial_id", STRING), ("epoch", _I), ("bucket", _I), ("width", _I), ("epoch_batches", _I)]
    + [(k, _BUCKET_TYPES.get(k, _I)) for k in BUCKET_FIELDS[1:]])
EPOCHS_SCHEMA = pa.schema([("trial_id", STRING), ("epoch", _I)]
                          + [(k, _F) for k in EPOCH_FLOATS] + [(k, _I) for k in EPOCH_INTS]
                          + [(CHECKPOINT_KEY, STRING)])
# Per (trial, epoch, module, metric): the per-module validation (`val_modules`), long.
MODULES_SCHEMA = pa.schema([("trial_id", STRING), ("epoch", _I), ("module", STRING),
                           ("metric", STRING), ("value", _F)])
# Per trial; the config's own keys follow as `config.<flattened key>` columns.
TRIALS_SCHEMA = pa.schema(
    [("trial_id", STRING), ("status", STRING), ("error", STRING), ("stop_reason", STRING),
     ("lr", _F), ("precision", STRING)]
    + [(last_column(k), _I) for k in LAST_INTS] + [(last_column(k), _F) for k in LAST_FLOATS]
    + [("best_epoch", _I)] + [(f"best_{k}", _F) for k, _ in BEST] + [("config_json", STRING)])
_PARQUET_OPTIONS = {"use_dictionary": ["trial_id"], "compression": "snappy"}


@dataclass
class TrialInfo:
    """What the report knows about a trial besides its curves."""

    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)   # flattened, JSON-safe
    status: str = "PENDING"
    error: str | None = None
    last: dict[str, Any] = field(default_factory=dict)     # cleaned subset of the last result

    def update(self, result: Mapping[str, Any]) -> None:
        self.last.update({k: finite(result[k]) for k in LAST_FLOATS if k in result})
        self.last.update({k: as_int(result[k], None) for k in LAST_INTS if k in result})
        if "stop_reason" in result:
            self.last["stop_reason"] = str(result["stop_reason"] or "")
        if result.get("precision"):
            self.last["precision"] = str(result["precision"])


# ---- rows ----
def trials_table_row(info: TrialInfo, best: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's row of trials.parquet: its last values and its best epoch."""
    last, config = info.last, info.config
    row: dict[str, Any] = {"trial_id": info.trial_id, "status": info.status, "error": info.error,
                           "stop_reason": last.get("stop_reason") or None, "lr": _config_lr(config),
                           "precision": last.get("precision")}
    row.update({last_column(k): last.get(k) for k in LAST_INTS + LAST_FLOATS})
    # Before its first report a trial's architecture is known only from its config.
    for key in ("d_model", "num_heads"):
        row[key] = row[key] or _config_int(config, key)
    if row["head_dim"] is None and row["d_model"] and row["num_heads"]:
        row["head_dim"] = row["d_model"] // row["num_heads"]
    row["best_epoch"] = best.get("epoch")
    row.update({f"best_{k}": best.get(k) for k, _ in BEST})
    row["config_json"] = json.dumps(config, sort_keys=True, allow_nan=False)
    return row


def info_from_row(row: Mapping[str, Any]) -> TrialInfo:
    """The inverse of `trials_table_row` as far as a restarted driver needs it."""
    last = {k: row.get(last_column(k)) for k in LAST_INTS + LAST_FLOATS}
    last["stop_reason"] = row.get("stop_reason") or ""
    last["precision"] = row.get("precision")
    return TrialInfo(row["trial_id"], json.loads(row.get("config_json") or "{}"),
                     row.get("status") or "PENDING", row.get("error"),
                     {k: v for k, v in last.items() if v is not None})


def best_metrics(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Best validation values over closed epochs; `epoch` is the one with the best loss."""
    best: dict[str, Any] = {}
    epochs = sorted(summaries)
    for key, mode in BEST:
        i = best_index([summaries[e].get(key) for e in epochs], mode)
        if i is not None:
            best[key] = summaries[epochs[i]][key]
            if key == "val_loss":
                best["epoch"] = epochs[i]
    return best


def curve_columns(store: CurveStore) -> dict[str, dict[str, list]]:
    """Per trial, its buckets as columns in CURVES_SCHEMA order: the rows of curves.parquet
    (columns, because a write serialises up to points x epochs x trials of them)."""
    out: dict[str, dict[str, list]] = {}
    for tid in sorted(store.trials):
        curves = store.trials[tid].sorted_epochs()
        bs = [b for c in curves for b in c.buckets]
        per_epoch = [(c, len(c.buckets)) for c in curves]
        out[tid] = {
            "trial_id": [tid] * len(bs),
            "epoch": [c.epoch for c, n in per_epoch for _ in range(n)],
            "bucket": [b.index for b in bs],
            "width": [c.width for c, n in per_epoch for _ in range(n)],
            "epoch_batches": [c.epoch_batches for c, n in per_epoch for _ in range(n)],
            "micro_batch_first": [b.micro_batch_first for b in bs],
            "micro_batch_last": [b.micro_batch_last for b in bs],
            "count": [b.count for b in bs], "nonfinite": [b.nonfinite for b in bs],
            "mean": [b.mean for b in bs], "min": [b.min for b in bs], "max": [b.max for b in bs],
            "last": [b.last for b in bs], "sum": [b.sum for b in bs]}
    return out


def curves_table(columns: Mapping[str, Mapping[str, list]]) -> pa.Table:
    tables = [pa.Table.from_pydict(dict(cols), schema=CURVES_SCHEMA) for cols in columns.values()]
    return pa.concat_tables(tables) if tables else CURVES_SCHEMA.empty_table()


def epoch_rows(store: CurveStore) -> list[dict[str, Any]]:
    """Every closed epoch of every trial (the rows of epochs.parquet)."""
    return [{"trial_id": tid, "epoch": e, **{k: v for k, v in s.items() if k != MODULES_KEY}}
            for tid in sorted(store.trials)
            for e, s in sorted(store.trials[tid].summaries.items())]


def module_rows(store: CurveStore) -> list[dict[str, Any]]:
    """Every closed epoch's validation per module, long (the rows of modules.parquet)."""
    return [{"trial_id": tid, "epoch": e, "module": module, "metric": metric, "value": value}
            for tid in sorted(store.trials)
            for e, s in sorted(store.trials[tid].summaries.items())
            for module, values in sorted((s.get(MODULES_KEY) or {}).items())
            for metric, value in values.items()]


def modules_by_epoch(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """modules.parquet rows back into {(trial, epoch): {module: {metric: value}}}."""
    out: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["trial_id"], int(r["epoch"])), {}).setdefault(r["module"], {})[r["metric"]] = r["value"]
    return out


def write_json(path: Path, doc: Any) -> None:
    # allow_nan=False: a NaN reaching this point is a bug and must fail the write loudly.
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f, **_PARQUET_OPTIONS))


def read_parquet(path: Path) -> pa.Table:
    """Read a report table through one open handle. A path-based `pq.read_table` opens
    the file more than once, so a concurrent atomic replace can hand it the footer of one
    version and the pages of the next; a handle pins one version."""
    with open(path, "rb") as f:
        return pq.read_table(f)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        return read_parquet(path).to_pylist()
    except Exception as exc:  # a damaged file must not stop the sweep from resuming
        logger.error("report: could not read %s: %s: %s", path, type(exc).__name__, exc)
        return []


def epoch_checkpoints(report_dir: Path) -> dict[tuple[str, int], str]:
    """(trial id, epoch) -> that epoch's checkpoint path on storage, from epochs.parquet."""
    return {(row["trial_id"], int(row["epoch"])): row[CHECKPOINT_KEY]
            for row in read_rows(report_dir / EPOCHS_FILE) if row.get(CHECKPOINT_KEY)}


def column_type(values: Iterable[Any]) -> pa.DataType:
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return pa.bool_()
    if kinds and kinds <= {int}:
        return _I
    if kinds and kinds <= {int, float}:
        return _F
    return STRING


# ---- config and errors ----
def safe_name(name: str) -> str:
    """A trial id usable as one path component (Tune's ids already are)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return cleaned if cleaned.strip(".") else "_"



def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys; values become JSON-safe scalars or text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, str)):
            flat[name] = value
        elif isinstance(value, float):
            flat[name] = finite(value)
        else:
            flat[name] = json.dumps(jsonable(value), ensure_ascii=False, separators=(",", ":"))
    return flat


def jsonable(obj: Any) -> Any:
    """A deep copy that json accepts: non-finite floats become None, unknowns text."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return finite(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _config_int(config: Mapping[str, Any], name: str) -> int | None:
    for key, value in config.items():
        if (key == name or key.endswith(f".{name}")) and isinstance(value, int):
            return value
    return None


def _config_lr(config: Mapping[str, Any]) -> float | None:
    for key in ("lr", "train.lr"):
        if isinstance(config.get(key), (int, float)) and not isinstance(config[key], bool):
            return float(config[key])
    return None
