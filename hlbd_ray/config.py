"""The config schema: one dataclass per concern, loaded from YAML plus dotlist overrides.

The dataclasses are the documentation: every YAML in `conf/` is validated against them,
unknown keys and wrong types are errors, and `validate` refuses impossible values with
one line naming what is wrong, before any Ray work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hlbd_ray.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ATTENTION_KINDS = ("standard", "autopoietic")


@dataclass
class ModelConfig:
    d_model: int = 256
    num_heads: int = 8
    num_layers: int = 6
    d_ff: int = 1024
    dropout: float = 0.1
    # "standard" (fused causal SDPA) or "autopoietic" (learned pointwise score transform).
    attention: str = "standard"
    # Optional "package.module:function" returning an nn.Module mapping ids -> logits;
    # it receives the ModelSpec (this config plus vocab_size and max_seq_len).
    factory: Optional[str] = None


@dataclass
class DataConfig:
    # HLBD JSON files (Full or Hardcore shape, detected per file). Empty: built-in generator.
    paths: List[str] = field(default_factory=list)
    # Pairs per module produced by the built-in generator.
    generated_per_module: int = 400
    val_fraction: float = 0.1
    # Seeds the split and the generator: same seed, same data, in every process.
    seed: int = 0
    # Characters beyond this vocabulary size (rarest first) map to [UNK].
    max_vocab: int = 5000


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 16
    grad_accum: int = 2
    lr: float = 3e-4
    weight_decay: float = 0.01
    # Linear warmup, then cosine annealing with warm restarts (optimizer steps).
    warmup_steps: int = 20
    restart_steps: int = 200
    restart_mult: int = 2
    min_lr: float = 1e-5
    grad_clip: float = 1.0
    # "auto": bf16 autocast where it measured faster (GPU, CPU with AMX), else fp32.
    precision: str = "auto"
    # Longest sequence [BOS] prompt [SEP] answer [EOS]; longer answers are cut (and
    # counted). Measured on HLBD Full V2: median 140, p99 180, longest 232 tokens, so 256
    # cuts none; batches pad only to their own longest sequence.
    max_len: int = 256
    # "answer": loss and accuracy on answer tokens only; "all": every real token.
    loss_on: str = "answer"
    # Report (and send batch losses) every N optimizer steps.
    report_every: int = 10
    # Validation pairs greedily decoded for val_exact at each epoch end.
    exact_samples: int = 32
    # Stop the run when this many optimizer steps in a row had non-finite gradients.
    max_consecutive_skips: int = 20
    # Stop after this many optimizer steps in total (0: no limit); for smoke runs.
    max_steps: int = 0
    seed: int = 0
    # Ray Train scaling: workers per run, and the resources each worker asks for.
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Retries of a run from its last checkpoint after a worker failure.
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    progress_bar: bool = True


@dataclass
class SpaceConfig:
    """The searched space; num_heads x d_model pairs that do not divide are never sampled."""

    d_model: List[int] = field(default_factory=lambda: [256])
    num_heads: List[int] = field(default_factory=lambda: [2, 4, 8])
    lr_min: float = 1e-4
    lr_max: float = 3e-3
    # Grid search only: number of log-spaced learning rates between lr_min and lr_max.
    lr_grid_points: int = 3


@dataclass
class SweepConfig:
    name: str = "sweep"
    # "random", "grid" (Tune's basic generator) or "optuna" (TPE).
    search: str = "random"
    num_samples: int = 8
    # 0: as many as the cluster's resources allow at once.
    max_concurrent_trials: int = 0
    seed: int = 0
    metric: str = "val_loss"
    mode: str = "min"
    # "asha" (early stopping at epoch rungs) or "fifo".
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    # Wall-clock budget for the whole sweep in seconds (0: none).
    time_budget_s: float = 0.0
    # Retries of an errored trial by Tune (after Train's own retries are spent).
    trial_max_failures: int = 0
    # Stop the sweep (state saved, exit code 3; rerunning resumes it) when no trial has
    # reported for this long while trials are pending or running. 0: the longer of 10
    # minutes or 3x the slowest epoch seen. Train's worker-group start timeout follows it.
    stall_timeout_s: float = 0.0
    space: SpaceConfig = field(default_factory=SpaceConfig)


@dataclass
class ReportConfig:
    points_per_epoch: int = 100
    every_s: float = 10.0


@dataclass
class FaultConfig:
    """Fault injection for tests; everything off by default."""

    # Raise an exception / SIGKILL the worker / poison the loss at this optimizer step
    # (-1: never). `once` fires each fault a single time per run folder, so a retry from
    # the checkpoint succeeds; with once=false every attempt fails.
    raise_at_step: int = -1
    kill_at_step: int = -1
    nan_from_step: int = -1
    once: bool = True
    # A worker sleeps `sleep_s` seconds at this optimizer step (-1: never): a stalled
    # trial, for the sweep's stall watchdog.
    sleep_at_step: int = -1
    sleep_s: float = 3600.0
    # Only trials whose num_heads equals this value are faulted (0: all).
    only_num_heads: int = 0


@dataclass
class ClusterConfig:
    # None: attach to a running cluster if RAY_ADDRESS is set (as inside `ray job submit`),
    # else start a local one; "auto" attaches to the head started on this machine.
    address: Optional[str] = None
    # Local cluster only (None: what the machine has).
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    # A local cluster always starts the dashboard: besides the UI, its state API is how
    # Ray Train frees the CPUs of an early-stopped trial. Bound to this host only.
    dashboard_host: str = "127.0.0.1"
    # How often Ray Train's controller polls workers; its 2 s default blocks every report.
    health_check_interval_s: float = 0.05


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Local folder for what the driver writes: run files, reports, the best config.
    output_dir: str = "runs"
    # Where Ray persists experiment state and checkpoints: a local folder (None: output_dir)
    # or a URI pyarrow understands (s3://, gs://, a shared mount) for multi-node clusters.
    storage_path: Optional[str] = None
    # The single-run job's folder name under output_dir (the sweep uses sweep.name).
    name: str = "train"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema <- YAML file <- dotlist overrides, then `validate`. Errors are UserErrors."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), f"config file {path}")
    for bad in (o for o in overrides or [] if "=" not in o):
        raise UserError(f"bad override {bad!r}: use key=value, e.g. train.lr=1e-3")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides or []))
    except Exception as err:  # the dotlist parser raises grammar errors of several kinds
        raise UserError(f"bad override syntax ({_first_line(err)}); use key=value") from None
    merged = _merge(merged, dotlist, "override")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise UserError(f"{where}: {_first_line(err)}") from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml's parser errors have no common base we can name
        raise UserError(f"config file {path} is not valid YAML: {_first_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message


def valid_head_counts(d_model: int, candidates: range | list[int] | None = None) -> list[int]:
    pool = candidates if candidates is not None else range(1, d_model + 1)
    return [h for h in pool if h > 0 and d_model % h == 0]


def check_heads(d_model: int, num_heads: int) -> None:
    if d_model <= 0 or num_heads <= 0 or d_model % num_heads:
        valid = valid_head_counts(d_model) if d_model > 0 else []
        raise UserError(
            f"model.d_model={d_model} is not divisible by model.num_heads={num_heads}; "
            f"valid head counts for d_model={d_model}: {valid}"
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _positive(**values: float) -> None:
    for key, value in values.items():
        _require(value > 0 and math.isfinite(value), f"{key} must be > 0, got {value}")


def check_model(m: Any) -> None:
    """The model's own invariants, for a ModelConfig and for a ModelSpec (which a
    checkpoint may bring back), so that no impossible shape reaches the model code."""
    _positive(**{f"model.{key}": getattr(m, key) for key in ("d_model", "num_layers", "d_ff")})
    check_heads(m.d_model, m.num_heads)
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(m.attention in ATTENTION_KINDS, f"model.attention must be "
             f"{' or '.join(repr(kind) for kind in ATTENTION_KINDS)}, got {m.attention!r}")


def validate(cfg: Config) -> None:
    """Refuse impossible values with one line naming the key; the sweep adds its own."""
    m, d, t = cfg.model, cfg.data, cfg.train
    check_model(m)
    _positive(**{"train.lr": t.lr, "train.epochs": t.epochs,
                 "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                 "train.max_len": t.max_len, "train.report_every": t.report_every,
                 "train.num_workers": t.num_workers, "train.restart_steps": t.restart_steps,
                 "data.max_vocab": d.max_vocab, "report.points_per_epoch": cfg.report.points_per_epoch,
                 "report.every_s": cfg.report.every_s})
    _require(t.loss_on in ("answer", "all"), f"train.loss_on must be 'answer' or 'all', got {t.loss_on!r}")
    _require(t.precision in ("auto", "fp32", "bf16"),
             f"train.precision must be 'auto', 'fp32' or 'bf16', got {t.precision!r}")
    _require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(d.generated_per_module > 0 or bool(d.paths),
             "data.generated_per_module must be > 0 when data.paths is empty")
    _require(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}")
    _require(t.warmup_steps >= 0 and t.max_steps >= 0 and t.restart_mult >= 1,
             "train.warmup_steps and train.max_steps must be >= 0, train.restart_mult >= 1")
    _require(t.cpus_per_worker > 0, f"train.cpus_per_worker must be > 0, got {t.cpus_per_worker}")
    _require(t.gpus_per_worker >= 0, f"train.gpus_per_worker must be >= 0, got {t.gpus_per_worker}")
    # batch_losses travel in every report; keep that list bounded.
    _require(t.report_every * t.grad_accum <= 2000,
             "train.report_every * train.grad_accum must be <= 2000 (bounded report size)")
    _require(bool(cfg.output_dir), "output_dir must not be empty")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for Ray configs and checkpoints: no OmegaConf objects)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(values: dict) -> Config:
    """Inverse of `to_dict`, with the same schema checks as `load_config`."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(values), "config")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg
