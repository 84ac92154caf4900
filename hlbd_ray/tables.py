"""The report's file formats: explicit Arrow schemas, one row per trial, the serialised
epochs cached between writes, and the atomic writers and safe readers of the parquet
tables and JSON documents that `hlbd_ray.report` keeps up to date.

Non-finite numbers never reach a file: they are written as null.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from hlbd_ray.curves import SUMMARY_INT_KEYS, SUMMARY_KEYS, EpochCurve, as_int, finite
from hlbd_ray.files import atomic_write

logger = logging.getLogger(__name__)


SCHEMA_VERSION = 1
REPORT_DIR = "report"
CURVES_FILE, EPOCHS_FILE, TRIALS_FILE = "curves.parquet", "epochs.parquet", "trials.parquet"
JSON_FILE = "experiment_report.json"

_I, _F, STRING = pa.int64(), pa.float64(), pa.string()
CURVES_SCHEMA = pa.schema([
    ("trial_id", STRING), ("epoch", _I), ("bucket", _I), ("width", _I), ("epoch_batches", _I),
    ("step_first", _I), ("step_last", _I), ("count", _I), ("nonfinite", _I),
    ("mean", _F), ("min", _F), ("max", _F), ("last", _F),
    # The exact running sum: a bucket resumed from this file continues bit for bit.
    ("sum", _F),
])
EPOCHS_SCHEMA = pa.schema([("trial_id", STRING), ("epoch", _I)]
                          + [(k, _F) for k in SUMMARY_KEYS] + [(k, _I) for k in SUMMARY_INT_KEYS])
# Per trial; the config's own keys follow as `config.<flattened key>` columns.
LAST_FLOATS = ("loss", "ppl", "acc", "epoch_loss", "val_loss", "val_ppl", "val_acc",
               "val_exact", "lr", "grad_norm", "tokens_per_s", "time_total_s")
LAST_INTS = ("epoch", "epochs_done", "step", "batch", "skipped_steps", "val_step",
             "training_iteration", "d_model", "num_heads", "head_dim")
BEST = (("val_loss", min), ("val_ppl", min), ("val_acc", max), ("val_exact", max))
TRIALS_SCHEMA = pa.schema(
    [("trial_id", STRING), ("status", STRING), ("error", STRING), ("stop_reason", STRING),
     ("num_heads", _I), ("d_model", _I), ("head_dim", _I), ("lr", _F), ("precision", STRING),
     ("epochs", _I), ("step", _I), ("batches", _I), ("iterations", _I),
     ("time_total_s", _F), ("skipped_steps", _I)]
    + [(f"last_{k}", _F) for k in LAST_FLOATS if k != "time_total_s"]
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


# ---- rows and text ----
def trial_row(info: TrialInfo, best: Mapping[str, Any]) -> dict[str, Any]:
    last, config = info.last, info.config
    d_model = last.get("d_model") or _config_int(config, "d_model")
    heads = last.get("num_heads") or _config_int(config, "num_heads")
    head_dim = last.get("head_dim") or (d_model // heads if d_model and heads else None)
    row = {"trial_id": info.trial_id, "status": info.status, "error": info.error,
           "stop_reason": last.get("stop_reason") or None, "num_heads": heads,
           "d_model": d_model, "head_dim": head_dim, "lr": _config_lr(config),
           "precision": last.get("precision"),
           "epochs": last.get("epochs_done"), "step": last.get("step"),
           "batches": last.get("batch"), "iterations": last.get("training_iteration"),
           "time_total_s": last.get("time_total_s"), "skipped_steps": last.get("skipped_steps")}
    row.update({f"last_{k}": last.get(k) for k in LAST_FLOATS if k != "time_total_s"})
    row["best_epoch"] = best.get("epoch")
    row.update({f"best_{k}": best.get(k) for k, _ in BEST})
    row["config_json"] = json.dumps(config, sort_keys=True, allow_nan=False)
    return row


def info_from_row(row: Mapping[str, Any]) -> TrialInfo:
    """The inverse of `trial_row` as far as a restarted driver needs it."""
    last = {k: row.get(f"last_{k}") for k in LAST_FLOATS if k != "time_total_s"}
    last.update({"time_total_s": row.get("time_total_s"), "epochs_done": row.get("epochs"),
                 "step": row.get("step"), "batch": row.get("batches"),
                 "training_iteration": row.get("iterations"), "d_model": row.get("d_model"),
                 "num_heads": row.get("num_heads"), "head_dim": row.get("head_dim"),
                 "skipped_steps": row.get("skipped_steps"),
                 "stop_reason": row.get("stop_reason") or "", "precision": row.get("precision")})
    return TrialInfo(row["trial_id"], json.loads(row.get("config_json") or "{}"),
                     row.get("status") or "PENDING", row.get("error"),
                     {k: v for k, v in last.items() if v is not None})


def best_metrics(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Best validation values over closed epochs; `epoch` is the one with the best loss."""
    best: dict[str, Any] = {}
    for key, pick in BEST:
        values = [(s.get(key), e) for e, s in summaries.items() if s.get(key) is not None]
        if values:
            value, epoch = pick(values)
            best[key] = value
            if key == "val_loss":
                best["epoch"] = epoch
    return best


class EpochPart:
    """One epoch of one trial, serialised: its rows as Arrow and as JSON text."""

    __slots__ = ("rev", "rows", "cols", "table", "bodies", "json")
    FIELDS = ("step_first", "step_last", "count", "nonfinite", "mean", "min", "max", "last")

    def __init__(self, tid: str, curve: EpochCurve) -> None:
        bs = curve.buckets
        n = self.rows = len(bs)
        mean = [b.mean for b in bs]
        lo = [b.lo if b.count else None for b in bs]
        hi = [b.hi if b.count else None for b in bs]
        # Columns in CURVES_SCHEMA order.
        self.cols: list | None = [
            [tid] * n, [curve.epoch] * n, [b.index for b in bs], [curve.width] * n,
            [curve.epoch_batches] * n, [b.step_first for b in bs], [b.step_last for b in bs],
            [b.count for b in bs], [b.nonfinite for b in bs], mean, lo, hi,
            [b.last for b in bs], [b.sum for b in bs]]
        self.rev = curve.rev
        self.table: pa.Table | None = None
        self.bodies = {name: dumps(col)[1:-1] for name, col in zip(self.FIELDS, self.cols[5:13])}
        self.bodies["epoch"] = ",".join([str(curve.epoch)] * n)
        # The sweep document's object for this epoch, as pieces that reference the field
        # texts above instead of holding a second copy of them.
        head = {"epoch": curve.epoch, "epoch_batches": curve.epoch_batches, "width": curve.width}
        self.json = json_object_pieces(head, {k: json_array([self.bodies[k]] if n else [])
                                          for k in self.FIELDS})


def curve_table(cols_list: list[list]) -> pa.Table:
    arrays = [pa.array(list(chain.from_iterable(cols[i] for cols in cols_list)), type=f.type)
              for i, f in enumerate(CURVES_SCHEMA)]
    return pa.Table.from_arrays(arrays, schema=CURVES_SCHEMA)


def concat_curves(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks() if tables else CURVES_SCHEMA.empty_table()


# allow_nan=False: a NaN reaching this point is a bug and must fail the write loudly.
# One encoder for all calls: building one per call costs more than encoding a short list.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
dumps = _ENCODER.encode
_key = json.encoder.encode_basestring  # type: ignore[attr-defined]


def json_object_pieces(head: Mapping[str, Any], raw: Mapping[str, list[str]]) -> list[str]:
    """A JSON object from plain values plus members given as JSON text pieces. Pieces
    let the big members (cached epochs, MBs in all) be copied once, by the final join,
    instead of once per nesting level."""
    text = dumps(dict(head))
    pieces = [text[:-1]]
    sep = "," if len(text) > 2 else ""
    for key, value in raw.items():
        pieces.append(f"{sep}{_key(key)}:")
        pieces.extend(value)
        sep = ","
    pieces.append("}")
    return pieces


def json_array(items: list[str]) -> list[str]:
    """Pieces of a JSON array whose items (or comma-joined runs of items) are JSON text."""
    if not items:
        return ["[]"]
    pieces = [","] * (2 * len(items) + 1)
    pieces[0], pieces[-1] = "[", "]"
    pieces[1::2] = items
    return pieces


def json_array_of_pieces(items: list[list[str]]) -> list[str]:
    pieces = ["["]
    for i, item in enumerate(items):
        if i:
            pieces.append(",")
        pieces.extend(item)
    pieces.append("]")
    return pieces


_CHUNK = 1 << 20


def write_pieces(path: Path, pieces: list[str]) -> None:
    """Write JSON pieces joined into ~1 MiB chunks: `writelines` makes a system call per
    large piece (measured 4x slower), and one join of the whole document would hold a
    second and third copy of it (text and bytes) in memory at once."""
    def write(f: Any) -> None:
        batch: list[str] = []
        size = 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece)
            if size >= _CHUNK:
                f.write("".join(batch).encode("utf-8"))
                batch, size = [], 0
        f.write("".join(batch).encode("utf-8"))

    atomic_write(path, write)


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
            flat[name] = dumps(jsonable(value))
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
