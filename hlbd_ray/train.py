"""The APT training function: what every Ray Train worker runs.

One run = build (model, optimizer, schedule), maybe resume, then per epoch: train in
accumulation groups, report every `report_every_steps` optimizer steps, validate, checkpoint.
The loop reads top to bottom in `TrainRun.fit`; each side concern is one method.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlbd_ray.banner import actor_banner, name_actor_in_logs
from hlbd_ray.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from hlbd_ray.config import Config, from_dict, to_dict
from hlbd_ray.contract import Report
from hlbd_ray.data import IGNORE_INDEX, Batch, PreparedData, iter_batches, num_batches
from hlbd_ray.faults import FaultInjector
from hlbd_ray.metrics import (
    ROW_COUNTS,
    TokenCounts,
    Window,
    all_reduce_sums,
    count_tokens,
    finite_or_none,
    perplexity,
    row_counts,
    token_loss_sum,
)
from hlbd_ray.model import ModelSpec, build_model
from hlbd_ray.optim import build_lr_schedule, build_optimizer, restore_lr_schedule, run_length
from hlbd_ray.precision import resolve_precision
from hlbd_ray.progress import EpochBar
from hlbd_ray.session import LocalSession, RayTrainSession, autocast, scratch_dir
from hlbd_ray.tokenizer import CharTokenizer
from hlbd_ray.worker_exit import check, stopped_before_exit


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: `{"config": to_dict(cfg), "data": PreparedData or its ObjectRef}`."""
    import ray

    data = loop_config["data"]
    if isinstance(data, ray.ObjectRef):
        # Zero-copy from the object store: every trial shares one tokenized copy.
        data = ray.get(data)
    cfg, session = from_dict(loop_config["config"]), RayTrainSession()
    name_actor_in_logs(actor_banner(session.run_name, f"Train worker rank {session.rank} of {session.world_size}",
                                    cfg.model.d_model, cfg.model.num_heads, cfg.train.lr))
    # Ray Train runs this in a daemon thread: it must stop before its process finalizes.
    with stopped_before_exit() as exiting:
        TrainRun(cfg, data, session, exiting).fit()


def train_locally(cfg: Config, data: PreparedData, run_dir: str | Path,
                  resume_from: str | Path | None = None) -> LocalSession:
    """The same loop in this process (tests and benchmarks); returns the session's record."""
    session = LocalSession(run_dir, resume_from=resume_from, run_name=cfg.name)
    TrainRun(cfg, data, session).fit()
    return session


# Ray Train's retention multiplies the score by -1 for mode "min" and fails on None, and
# reports must be JSON (no inf): a missing or non-finite metric ranks as this, the worst.
WORST_SCORE = {"min": 1e300, "max": -1e300}


def checkpoint_score(val: dict[str, Any], metric: str, mode: str) -> float:
    """The validation metric a checkpoint is kept by, always a finite number."""
    value = val.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return WORST_SCORE[mode]


# --- the run's state: everything a checkpoint must carry besides tensors ----------------


@dataclass
class RunState:
    epoch: int = 0              # next epoch to train (0-based)
    step: int = 0               # optimizer steps done
    batches: int = 0            # micro-batches done (global index of the next one)
    skipped_steps: int = 0      # steps skipped for non-finite gradients
    consecutive_skips: int = 0
    val: dict[str, Any] = field(default_factory=lambda: {
        "val_loss": None, "val_ppl": None, "val_acc": None, "val_exact": None, "val_step": -1,
        "val_modules": {}})
    history: list[dict[str, Any]] = field(default_factory=list)  # one summary per epoch
    stop_reason: str = ""
    last_metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch-end report


# --- the loop ------------------------------------------------------------------------------


class TrainRun:
    def __init__(self, cfg: Config, data: PreparedData, session: Any, exiting: threading.Event | None = None):
        self.cfg, self.t, self.data, self.session = cfg, cfg.train, data, session
        self.exiting = exiting or threading.Event()    # set when the worker's process exits
        self.rank, self.world = session.rank, session.world_size
        self.device = session.device
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.t.cpus_per_worker)))
        self._seed(self.t.seed + self.rank)
        self.precision = resolve_precision(self.t.precision, self.device)
        self.tokenizer = CharTokenizer.from_dict(data.tokenizer)
        if not isinstance(self.t.max_len, int):
            raise ValueError(f"train.max_len={self.t.max_len!r} must be resolved to the length the data "
                             "were cut at before training (run.preflight does it)")
        self.spec = ModelSpec.from_config(cfg.model, len(self.tokenizer), self.t.max_len)
        self.model = build_model(self.spec, cfg.model.factory).to(self.device)
        self.optimizer = build_optimizer(self.model, self.t)
        self.steps_per_epoch, self.total_steps = run_length(self.t, data.train, self.world)
        self.scheduler = build_lr_schedule(self.optimizer, self.t, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = RunState()
        # Every module from the first report on (None until validated): Tune's CSV log
        # takes its columns from the first result it sees.
        self.state.val["val_modules"] = {data.val.module_names[i]: {"loss": None, "exact": None}
                                         for i in sorted(set(data.val.modules.tolist()))}
        self.session.restore(self._load)
        # The LR the last optimizer step used (what reports show); the scheduler holds the next one's.
        self.step_lr = float(self.optimizer.param_groups[0]["lr"])
        self.ddp_model = session.prepare_model(self.model)
        self.epoch_batches = num_batches(data.train, self.t.batch_size, self.world)
        self.faults = FaultInjector(cfg, session.run_name)
        self.window, self.window_start = Window(), time.perf_counter()
        self.epoch_counts = TokenCounts()

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def fit(self) -> RunState:
        """Train the remaining epochs; returns the final state (also in the last report)."""
        p = self.state
        trained = False
        while p.epoch < self.t.epochs and not self._finished():
            self.train_epoch()
            self.end_epoch()
            trained = True
        if not trained and p.last_metrics:
            # Resumed from a run that had already finished (its driver died after the last
            # checkpoint): repeat the final metrics so the caller still sees a result.
            self.session.report({**p.last_metrics, "batch_start": p.batches, "batch_losses": []})
        return p

    def _finished(self) -> bool:
        p = self.state
        return bool(p.stop_reason) or (self.t.max_steps > 0 and p.step >= self.t.max_steps)

    def train_epoch(self) -> None:
        self.model.train()
        self.epoch_counts = TokenCounts()
        batches = iter_batches(self.data.train, self.t.batch_size, seed=self.t.seed,
                               epoch=self.state.epoch, shuffle=True, rank=self.rank,
                               world_size=self.world, loss_on=self.t.loss_on)
        bar = EpochBar(self.rank == 0 and self.t.progress_bar, self.state.epoch,
                       self.t.epochs, self.epoch_batches)
        with bar:
            for group in self._groups(batches):
                self.faults.before_step(self.state.step, self.rank)
                self.accumulate(group)
                self.optimizer_step()
                bar.update(len(group), self.window, self.step_lr)
                if self._finished():
                    break
                # The epoch's last step is reported by end_epoch, with validation.
                if self.state.step % self.t.report_every_steps == 0 and not self._epoch_done():
                    self.report()

    def _epoch_done(self) -> bool:
        return self.state.batches >= (self.state.epoch + 1) * self.epoch_batches

    def _groups(self, batches: Iterator[Batch]) -> Iterator[list[Batch]]:
        """Accumulation groups of grad_accum micro-batches; the last, shorter group is kept."""
        group: list[Batch] = []
        for batch in batches:
            check(self.exiting)
            group.append(batch.to(self.device))
            if len(group) == self.t.grad_accum:
                yield group
                group = []
        if group:
            yield group

    def _autocast(self):
        return autocast(self.precision, self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def accumulate(self, group: list[Batch]) -> None:
        """Forward/backward each micro-batch; gradients = token mean over the whole group.

        Each micro-batch's summed loss is divided by the group's token count over all
        workers (times the world size, which DDP's gradient averaging divides out), so the
        accumulated gradient equals that of one big batch. The *recorded* loss is the
        micro-batch's own token mean, before any division.
        """
        local_tokens = sum(int((b.labels != IGNORE_INDEX).sum()) for b in group)
        group_tokens = max(all_reduce_sums([local_tokens])[0], 1)
        for i, b in enumerate(group):
            last = i == len(group) - 1
            sync = nullcontext() if last or self.world == 1 else self.ddp_model.no_sync()
            with sync:
                self._sync()
                start = time.perf_counter()
                with self._autocast():
                    logits = self.ddp_model(b.inputs)
                loss_sum = self.faults.loss(token_loss_sum(logits, b.labels), self.state.step)
                self._sync()
                mid = time.perf_counter()
                self.scaler.scale(loss_sum * (self.world / group_tokens)).backward()
                self._sync()
                end = time.perf_counter()
            counts = count_tokens(logits.detach(), b.labels, loss_sum)
            real_tokens = int((b.inputs != self.tokenizer.pad_id).sum())
            self.window.add_batch(counts, real_tokens, (mid - start) * 1e3, (end - mid) * 1e3)
            self.epoch_counts.add(counts)
        self.state.batches += len(group)

    def optimizer_step(self) -> None:
        """Clip and step; a non-finite gradient skips the update and is counted, never hidden."""
        p = self.state
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                    self.t.grad_clip if self.t.grad_clip > 0 else float("inf")))
        if math.isfinite(norm):
            self.scaler.step(self.optimizer)
            p.consecutive_skips = 0
            self.window.grad_norms.append(norm)
        else:
            p.skipped_steps += 1
            p.consecutive_skips += 1
            if p.consecutive_skips >= self.t.max_consecutive_skips:
                p.stop_reason = f"non-finite gradients for {p.consecutive_skips} consecutive steps"
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        p.step += 1

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation with dropout off, token-weighted, summed over workers' disjoint shares:
        overall, and per HLBD module of the split (`val_modules`: {module: {loss, exact}})."""
        self.model.eval()
        names = self.data.val.module_names
        sums = torch.zeros(len(names), len(ROW_COUNTS), dtype=torch.float64)
        batches = iter_batches(self.data.val, self.t.batch_size * 2, seed=self.t.seed, epoch=0,
                               shuffle=False, loss_on=self.t.loss_on)
        for i, batch in enumerate(batches):
            check(self.exiting)
            if i % self.world != self.rank:
                continue
            b = batch.to(self.device)
            with self._autocast():
                logits = self.model(b.inputs)
            rows = row_counts(logits, b.labels, b.answer, b.truncated).cpu()
            assert b.modules is not None  # make_batch always sets them; only hand-made batches lack them
            sums.index_add_(0, b.modules.cpu(), rows)
        sums = torch.tensor(all_reduce_sums(sums.flatten().tolist()), dtype=torch.float64).view_as(sums)
        self.model.train()
        overall = _val_metrics(sums.sum(0).tolist())
        return {"val_loss": overall["loss"], "val_ppl": perplexity(overall["loss"]),
                "val_acc": overall["acc"], "val_exact": overall["exact"], "val_step": self.state.step,
                "val_modules": {name: {k: m[k] for k in ("loss", "exact")}
                                for name, m in ((n, _val_metrics(sums[j].tolist())) for j, n in enumerate(names))
                                if m["tokens"]}}

    def end_epoch(self) -> None:
        """Validate, record the epoch, checkpoint and report (the report carries the checkpoint)."""
        p = self.state
        p.val = self.evaluate()
        p.history.append({"epoch": p.epoch, "epoch_loss": self._epoch_loss(), "step": p.step, **p.val})
        p.epoch += 1
        metrics = self._window_metrics(epoch_end=True)
        p.last_metrics = {k: v for k, v in metrics.items() if k != "batch_losses"}
        with scratch_dir() as folder:
            save_checkpoint(folder, self._state() if self.rank == 0 else None, self.rank)
            self._send(metrics, folder)

    def report(self) -> None:
        """A periodic report: the window since the last one, no validation, no checkpoint."""
        self._send(self._window_metrics(epoch_end=False))

    def _send(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.session.report(metrics, checkpoint_dir)
        self.window, self.window_start = Window(), time.perf_counter()

    def _epoch_loss(self) -> float | None:
        """Token-mean training loss of the epoch so far, over all workers (a collective)."""
        loss_sum, tokens = all_reduce_sums([self.epoch_counts.loss_sum, self.epoch_counts.tokens])
        return finite_or_none(loss_sum / tokens) if tokens else None

    def _window_metrics(self, epoch_end: bool) -> dict[str, Any]:
        """The window's report (the contract's keys, plain Python values)."""
        w, p = self.window.reduced(), self.state
        elapsed = time.perf_counter() - self.window_start
        n = max(w.batches, 1)
        return Report(
            epoch=p.epoch - 1 if epoch_end else p.epoch,
            epochs_done=p.epoch, step=p.step, batches=p.batches,
            batch_start=p.batches - w.batches, batch_losses=w.batch_losses(),
            epoch_batches=self.epoch_batches, epoch_end=epoch_end,
            # At the epoch's end, end_epoch has just reduced it into the history.
            epoch_loss=p.history[-1]["epoch_loss"] if epoch_end else self._epoch_loss(),
            loss=w.counts.loss, ppl=perplexity(w.counts.loss), acc=w.counts.acc,
            lr=self.step_lr,
            grad_norm=finite_or_none(sum(w.grad_norms) / len(w.grad_norms)) if w.grad_norms else None,
            fw_ms=w.fw_ms / n, bw_ms=w.bw_ms / n,
            tokens_per_s=w.input_tokens / elapsed if elapsed > 0 else 0.0,
            skipped_steps=p.skipped_steps, **p.val,
            d_model=self.spec.d_model, num_heads=self.spec.num_heads,
            head_dim=self.spec.d_model // self.spec.num_heads,
            precision=self.precision, stop_reason=p.stop_reason, seed=self.t.seed,
            checkpoint_score=checkpoint_score(p.val, self.cfg.sweep.metric, str(self.cfg.sweep.mode)),
        ).to_dict()

    # --- checkpoint state ---------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "progress": asdict(self.state), "tokenizer": self.data.tokenizer, "config": to_dict(self.cfg)}

    def _load(self, folder: Path) -> None:
        state, rng = load_checkpoint(folder, self.rank)
        if state["tokenizer"] != self.data.tokenizer:
            raise CheckpointError(f"checkpoint {folder} was trained with a different vocabulary")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {folder} does not fit this model: "
                                  f"{str(err).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        restore_lr_schedule(self.scheduler, state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = RunState(**state["progress"])
        if rng is not None:
            restore_rng(rng)


def _val_metrics(counts: list[float]) -> dict[str, Any]:
    """Loss, token accuracy and exact-answer share from summed ROW_COUNTS."""
    loss_sum, tokens, correct, exact, answered = counts
    total = TokenCounts(loss_sum, int(correct), int(tokens))
    return {"loss": total.loss, "acc": total.acc, "exact": exact / answered if answered else None,
            "tokens": int(tokens)}
