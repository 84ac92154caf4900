"""Fault injection for the fault-tolerance tests (`fault.*` in the config; off by default).

The training loop calls two hooks, `before_step` and `loss`, which do nothing unless a
fault is configured for this run: raise an exception or SIGKILL the worker at an
optimizer step, sleep there (a stalled trial), or poison the loss with NaN from a step on. With `fault.once`, a marker
file under `output_dir/.faults/<run>` makes each fault fire a single time per run, so a
retry from the checkpoint succeeds, as it would after a real crash.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from hlbd_ray.config import Config


class FaultInjector:
    """Test-only faults at chosen optimizer steps; `once` fires each a single time per run."""

    def __init__(self, cfg: Config, run_name: str):
        self.fault = cfg.fault
        steps = (self.fault.raise_at_step, self.fault.kill_at_step, self.fault.nan_from_step,
                 self.fault.sleep_at_step)
        targeted = self.fault.only_num_heads in (0, cfg.model.num_heads)
        self.active = targeted and any(s >= 0 for s in steps)
        self.marker_dir = Path(cfg.output_dir).resolve() / ".faults" / run_name

    def _fire_once(self, kind: str) -> bool:
        if not self.fault.once:
            return True
        marker = self.marker_dir / kind
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def before_step(self, step: int, rank: int) -> None:
        if not self.active or rank != 0:
            return
        if step == self.fault.raise_at_step and self._fire_once("raise"):
            raise RuntimeError(f"injected fault: exception at step {step}")
        if step == self.fault.kill_at_step and self._fire_once("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.fault.sleep_at_step and self._fire_once("sleep"):
            time.sleep(self.fault.sleep_s)

    def poison(self, step: int) -> bool:
        return self.active and 0 <= self.fault.nan_from_step <= step

    def loss(self, loss_sum: torch.Tensor, step: int) -> torch.Tensor:
        """The micro-batch's summed loss, or NaN from `nan_from_step` on (every worker)."""
        return loss_sum * float("nan") if self.poison(step) else loss_sum
