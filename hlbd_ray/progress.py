"""The per-epoch progress bar of rank 0, showing the window's loss, perplexity, accuracy,
learning rate and forward/backward milliseconds as they change.

On a terminal it is a normal tqdm bar. In Ray worker logs (not a terminal) carriage
returns would pile into one endless line, so each refresh becomes its own line, and
refreshes are throttled to keep the logs readable.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from hlbd_ray.metrics import Window, perplexity


class _LinePerRefresh:
    """A file for tqdm that turns each '\\r'-redraw into one log line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class EpochBar:
    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int):
        self.enabled = enabled
        self.bar: tqdm | None = None
        if enabled:
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                            file=sys.stderr if tty else _LinePerRefresh(sys.stderr),
                            mininterval=0.5 if tty else 15.0, dynamic_ncols=tty, ascii=not tty)

    def update(self, batches: int, window: Window, lr: float) -> None:
        if self.bar is None:
            return
        n = max(window.batches, 1)
        loss = window.counts.loss
        ppl = perplexity(loss)
        self.bar.set_postfix_str(
            f"Loss={_fmt(loss, '.4f')} PPL={_fmt(ppl, '.2f')} Acc={_fmt(window.counts.acc, '.3f')} "
            f"LR={lr:.2e} FW={window.fw_ms / n:.0f}ms BW={window.bw_ms / n:.0f}ms", refresh=False)
        self.bar.update(batches)

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
