"""A trial's parameter names and the architecture decoder, apart from search.py so that the
trial's process can read its parameters without importing Tune's searchers (optuna)."""

from __future__ import annotations

ARCH_KEY, LR_KEY = "arch", "lr"
# A trial's copy number: it runs with train.seed + copy. Tune's Repeater names it so
# (ray.tune.search.repeater.TRIAL_INDEX; a test checks they agree); the grid and the
# confirmation stage use the same key.
REPEAT_KEY = "__trial_index__"
STAGE_KEY = "stage"    # "confirm" in the confirmation stage's trials, absent in the search's


def decode_arch(arch: str) -> tuple[int, int]:
    d_model, num_heads = (int(part) for part in arch.split("x"))
    return d_model, num_heads
