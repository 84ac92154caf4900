"""The config schema: one dataclass per concern, loaded from YAML plus dotlist overrides.

The dataclasses are the documentation: every YAML in `conf/` is validated against them,
unknown keys and wrong types are errors, and `validate` refuses impossible values with
one line naming what is wrong, before any Ray work starts. Fields with a fixed set of
values are Enums, so OmegaConf itself refuses anything else and names the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hlbd_ray.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class Choice(str, Enum):
    """A config field with a fixed set of values. Members are named as their values (the
    names are what OmegaConf matches) and are strings, so `cfg.train.precision == "bf16"`
    holds and f-strings print the value; `to_dict` turns them into plain strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Precision(Choice):
    auto = "auto"   # bf16 autocast where it measured faster (GPU, CPU with AMX), else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"   # with a loss scaler: what auto picks on a GPU without bf16


class LossOn(Choice):
    answer = "answer"   # loss and accuracy on answer tokens (and [EOS]) only
    all = "all"         # every real token


class Attention(Choice):
    standard = "standard"         # fused causal SDPA
    autopoietic = "autopoietic"   # a learned pointwise transform of the scores


class Search(Choice):
    random = "random"   # Tune's basic generator
    grid = "grid"       # Tune's basic generator over grid_search values
    optuna = "optuna"   # Optuna TPE


class Schedule(Choice):
    cosine = "cosine"       # warmup, then one cosine from lr to min_lr over the whole run
    restarts = "restarts"   # warmup x cosine with warm restarts on epoch boundaries
    constant = "constant"   # warmup, then flat at lr


class Scheduler(Choice):
    asha = "asha"             # Ray's ASHA: a trial goes on unless below the cutoff of those ahead of it
    promotion = "promotion"   # ASHA as its paper states it: paused at a rung until it ranks (promotion.py)
    fifo = "fifo"   # every trial runs to the end


class Mode(Choice):
    min = "min"
    max = "max"


@dataclass
class ModelConfig:
    d_model: int = 256
    num_heads: int = 8
    num_layers: int = 6
    d_ff: int = 1024
    dropout: float = 0.1
    attention: Attention = Attention.standard
    # Optional "package.module:function" returning an nn.Module mapping ids -> logits;
    # it receives the ModelSpec (this config plus vocab_size and max_seq_len).
    factory: str | None = None


@dataclass
class DataConfig:
    # HLBD JSON files (Full or Hardcore shape, detected per file). Empty: built-in generator.
    paths: list[str] = field(default_factory=list)
    # Pairs per module produced by the built-in generator.
    generated_per_module: int = 400
    # Share of each module's pairs held out for validation, as whole facts (facts.py).
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
    # The learning-rate schedule (hlbd_ray/optim.py): a linear warmup over warmup_steps
    # optimizer steps, then `schedule`. The run's length in steps follows from epochs,
    # data size, batch_size, grad_accum, num_workers and max_steps.
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 20
    min_lr: float = 1e-5
    # schedule=restarts only (the reference's CosineAnnealingWarmRestarts, in epochs):
    # the first cosine period lasts restart_period_epochs (T_0), each next one
    # restart_period_mult (T_mult) times the one before; restarts fall on epoch boundaries.
    restart_period_epochs: int = 10
    restart_period_mult: int = 2
    grad_clip: float = 1.0
    precision: Precision = Precision.auto
    # Longest sequence [BOS] prompt [SEP] answer [EOS] (the model's position table).
    # "auto": the data's longest, rounded up to a multiple of 8, at most max_len_cap (HLBD
    # Full V2: median 140, p99 180, longest 232 tokens, so auto is 232). An integer that
    # cuts more than 1% of the answers is refused unless allow_truncation. Typed Any
    # because OmegaConf has no Union: validate accepts only "auto" or an integer > 0, and
    # the jobs write the resolved integer into config.yaml and checkpoints.
    max_len: Any = "auto"
    max_len_cap: int = 512
    allow_truncation: bool = False
    loss_on: LossOn = LossOn.answer
    # Report (and send batch losses) every N optimizer steps.
    report_every_steps: int = 10
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
    # Checkpoints kept per run: the best checkpoints_to_keep by sweep.metric (sweep.mode),
    # plus always the newest, which a retry or a resumed run continues from.
    checkpoints_to_keep: int = 2
    progress_bar: bool = True


@dataclass
class SpaceConfig:
    """The searched space; num_heads x d_model pairs that do not divide are never sampled."""

    d_model: list[int] = field(default_factory=lambda: [256])
    num_heads: list[int] = field(default_factory=lambda: [2, 4, 8])
    lr_min: float = 1e-4
    lr_max: float = 3e-3
    # Grid search only: number of log-spaced learning rates between lr_min and lr_max.
    lr_grid_points: int = 3
    # Explicit learning rates (empty: the range above): every searcher chooses among
    # them and grid runs each, so searches over one finite space compare (bench/regret.py).
    lr_values: list[float] = field(default_factory=list)


@dataclass
class ConfirmConfig:
    """After the search, the top_k distinct configs (by their mean best sweep.metric) are
    retrained from scratch at the full budget (every epoch, no early stopping), each with
    `seeds` new train.seed values; the winner is the config with the best mean final
    metric. top_k 0: no confirmation, the search's best trial is the answer."""

    top_k: int = 3
    seeds: int = 3


@dataclass
class SweepConfig:
    name: str = "sweep"
    search: Search = Search.random
    # Sampled configs (random, optuna); None: 8. Grid search runs every point once and
    # refuses a num_samples (copies of a point: sweep.repeats).
    num_samples: int | None = None
    # Copies of every grid point or sampled config, copy i with train.seed + i; a searcher
    # learns from the copies' mean. The trials table names each copy's seed.
    repeats: int = 1
    # 0: as many as the cluster's resources allow at once.
    max_concurrent_trials: int = 0
    seed: int = 0
    metric: str = "val_loss"
    mode: Mode = Mode.min
    scheduler: Scheduler = Scheduler.asha
    grace_period: int = 1
    reduction_factor: int = 2
    # scheduler asha only: it stops a trial at a rung only when at least this many trials
    # reached the rung before it (0: Ray's rule, where one earlier trial is enough); see
    # search.EpochASHA. The promotion scheduler ranks a trial against every trial at the rung.
    rung_min_peers: int = 0
    # Optuna search: random draws before TPE models the results (Optuna's
    # n_startup_trials, default 10), so a sweep of 10 trials or fewer is a random search.
    # conf/sweep.yaml models from the 4th: on bench/regret.py's space that finds a config
    # within the seed noise far more often than random draws (BENCHMARKS.md section 9).
    startup_trials: int = 10
    # Wall-clock budget for the whole sweep in seconds (0: none).
    time_budget_s: float = 0.0
    # Retries of an errored trial by Tune (after Train's own retries are spent).
    trial_max_failures: int = 0
    # Stop the sweep (state saved, exit code 3; rerunning resumes it) when no trial has
    # reported for this long while trials are pending or running. 0: the longer of 10
    # minutes or 3x the slowest epoch seen. Train's worker-group start timeout follows it.
    stall_timeout_s: float = 0.0
    # How each trial runs its Train run (BENCHMARKS.md section 3, "Levers (issue 14)"):
    # the Train controller inside the trial's own process instead of an actor of its own,
    # and no Train helper actors the sweep has no use for (the dataset manager, with no
    # Ray Data datasets; the placement-group cleaner, whose work the sweep's keeper does).
    # Both override private Ray Train hooks (trainer.trainer_class). In the trial's thread
    # the controller used to be still polling its workers (ray.wait) when Tune ended a
    # stopped trial's actor, which aborted ("free(): double free", SIGABRT); a stopped
    # trial now ends that thread first (trial.stoppable_trial, trial.joined_on_stop,
    # BENCHMARKS.md section 3). False: the controller is an actor of its own, as in stock Ray.
    controller_in_trial: bool = True
    lean_train_actors: bool = True
    # Tune's actor reuse between trials.
    reuse_actors: bool = False
    space: SpaceConfig = field(default_factory=SpaceConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)


DEFAULT_NUM_SAMPLES = 8


def sampled_configs(s: SweepConfig) -> int:
    """How many distinct configs a random or Optuna search samples."""
    return s.num_samples if s.num_samples is not None else DEFAULT_NUM_SAMPLES


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
    address: str | None = None
    # Local cluster only (None: what the machine has).
    num_cpus: int | None = None
    num_gpus: int | None = None
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
    storage_path: str | None = None
    # The single-run job's folder name under output_dir (the sweep uses sweep.name).
    name: str = "train"

    def resolved_storage_path(self) -> str:
        """storage_path once `trainer.preflight` has resolved it (None before means output_dir)."""
        if self.storage_path is None:
            raise RuntimeError("storage_path is not resolved: run trainer.preflight on the config first")
        return self.storage_path


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


def space_pairs(space: SpaceConfig) -> list[tuple[int, int]]:
    """Every (d_model, num_heads) of the space with d_model % num_heads == 0; an empty
    space, or one where no pair divides, is refused naming the valid head counts."""
    _require(bool(space.d_model) and bool(space.num_heads),
             "sweep.space.d_model and sweep.space.num_heads must not be empty")
    for key, values in (("d_model", space.d_model), ("num_heads", space.num_heads)):
        _require(all(v > 0 for v in values), f"sweep.space.{key} values must be > 0, got {list(values)}")
    pairs = [(d, h) for d in space.d_model for h in space.num_heads if d % h == 0]
    if not pairs:
        hints = "; ".join(f"d_model={d} allows num_heads in {valid_head_counts(d)}"
                          for d in space.d_model)
        raise UserError(f"sweep.space has no valid pair: no num_heads in {list(space.num_heads)} "
                        f"divides any d_model in {list(space.d_model)} ({hints})")
    return pairs


def check_sweep(s: SweepConfig) -> None:
    """The sweep section on its own: a space with valid pairs and learning rates, sane
    counts, and a name that stays one folder under output_dir."""
    sp = s.space
    _require(0 < sp.lr_min <= sp.lr_max and math.isfinite(sp.lr_max),
             f"sweep.space needs 0 < lr_min <= lr_max, got {sp.lr_min}, {sp.lr_max}")
    _require(sp.lr_grid_points >= 1, f"sweep.space.lr_grid_points must be >= 1, got {sp.lr_grid_points}")
    _require(all(sp.lr_min <= v <= sp.lr_max for v in sp.lr_values),
             f"sweep.space.lr_values must lie in [lr_min, lr_max], got {list(sp.lr_values)}")
    _require(not (s.search == "grid" and s.num_samples is not None),
             f"sweep.num_samples={s.num_samples} does not apply to grid search, which runs every "
             "point once: drop it (sweep.num_samples=null); for copies with other seeds use "
             "sweep.repeats")
    _require((s.num_samples is None or s.num_samples >= 1) and s.repeats >= 1
             and s.max_concurrent_trials >= 0 and s.time_budget_s >= 0 and s.stall_timeout_s >= 0,
             "sweep.num_samples and sweep.repeats must be >= 1; max_concurrent_trials, "
             "time_budget_s, stall_timeout_s >= 0")
    _require(s.confirm.top_k >= 0 and s.confirm.seeds >= 1,
             f"sweep.confirm.top_k must be >= 0 (0: off) and sweep.confirm.seeds >= 1, got "
             f"{s.confirm.top_k} and {s.confirm.seeds}")
    _require(s.startup_trials >= 1, f"sweep.startup_trials must be >= 1, got {s.startup_trials}")
    _require(s.grace_period >= 1 and s.reduction_factor >= 2 and s.rung_min_peers >= 0,
             "sweep.grace_period must be >= 1, sweep.reduction_factor >= 2 and sweep.rung_min_peers >= 0")
    _require(bool(s.name) and "/" not in s.name and not s.name.startswith("."),
             f"sweep.name must be a plain folder name, got {s.name!r}")
    space_pairs(sp)


def validate(cfg: Config, sweep: bool = False) -> None:
    """Refuse impossible values with one line naming the key (the schema has already
    refused unknown keys, wrong types and values outside a Choice).

    `sweep=True` adds what only a sweep needs: its sampled learning rates must not lie
    below the schedule's floor. A training run ignores the sweep section's learning
    rates, so that check would refuse its valid configs.
    """
    m, d, t = cfg.model, cfg.data, cfg.train
    check_model(m)
    _positive(**{"train.lr": t.lr, "train.epochs": t.epochs,
                 "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                 "train.max_len_cap": t.max_len_cap, "train.report_every_steps": t.report_every_steps,
                 "train.num_workers": t.num_workers, "train.checkpoints_to_keep": t.checkpoints_to_keep,
                 "train.restart_period_epochs": t.restart_period_epochs,
                 "data.max_vocab": d.max_vocab, "report.points_per_epoch": cfg.report.points_per_epoch,
                 "report.every_s": cfg.report.every_s})
    _require(t.max_len == "auto" or (type(t.max_len) is int and t.max_len > 0),
             f"train.max_len must be 'auto' or an integer > 0, got {t.max_len!r}")
    _require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(d.generated_per_module > 0 or bool(d.paths),
             "data.generated_per_module must be > 0 when data.paths is empty")
    _require(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}")
    _require(t.warmup_steps >= 0 and t.max_steps >= 0 and t.restart_period_mult >= 1,
             "train.warmup_steps and train.max_steps must be >= 0, train.restart_period_mult >= 1")
    _require(t.cpus_per_worker > 0, f"train.cpus_per_worker must be > 0, got {t.cpus_per_worker}")
    _require(t.gpus_per_worker >= 0, f"train.gpus_per_worker must be >= 0, got {t.gpus_per_worker}")
    # batch_losses travel in every report; keep that list bounded.
    _require(t.report_every_steps * t.grad_accum <= 2000,
             "train.report_every_steps * train.grad_accum must be <= 2000 (bounded report size)")
    _require(bool(cfg.output_dir), "output_dir must not be empty")
    check_sweep(cfg.sweep)
    if sweep:
        # The schedule's floor would otherwise lie above a sampled learning rate.
        _require(cfg.sweep.space.lr_min >= t.min_lr, f"sweep.space.lr_min={cfg.sweep.space.lr_min} "
                 f"is below train.min_lr={t.min_lr}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """Plain nested dict for Ray configs and checkpoints: no OmegaConf objects, and
    Choices as plain strings (the safe checkpoint loader refuses any other class)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True,  # type: ignore[return-value]
                                  enum_to_str=True)


def from_dict(values: dict) -> Config:
    """Inverse of `to_dict`, with the same schema checks as `load_config`."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(values), "config")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg
