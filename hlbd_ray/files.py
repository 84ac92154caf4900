"""Atomic file writes (readers polling a path only ever see a complete file), and the
output-folder check every job makes before it starts.

Every writer goes to a temporary file in the same folder, fsyncs it and renames it into
place; `os.replace` is atomic on POSIX file systems, so a concurrent reader sees either
the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hlbd_ray.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(fileobj)` on a temporary sibling of `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The temporary file is ours alone; removing it keeps the folder clean and the
        # original exception still propagates.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON with NaN/inf refused: a non-finite number must be written as null upstream."""
    text = json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def ensure_writable_dir(path: str | Path) -> Path:
    """Create the output folder or refuse before any work starts, naming the folder."""
    folder = Path(path).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output folder {folder} cannot be created: {err.strerror}") from None
    try:
        # A real write, not os.access: permission bits say nothing about read-only mounts
        # (or to root).
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"output folder {folder} is not writable: {err.strerror}") from None
    return folder
