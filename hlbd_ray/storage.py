"""Paths in Ray's storage: a local folder or a URI pyarrow understands, query included.

`storage_path=s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http` is how
pyarrow (`FileSystem.from_uri`) and so Ray Train and Tune take an S3-compatible server;
the query configures the filesystem, so paths are joined before it, never after.
Ray reports checkpoint paths on that filesystem ("bucket/runs/..."): `storage_uri`
turns one back into a URI another process can open.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from hlbd_ray.errors import UserError

# How long a finished job waits for storage calls still running in other threads.
STUCK_CALLS_GRACE_S = 30.0


def is_uri(path: str) -> bool:
    return "://" in path


def storage_join(base: str, *parts: str) -> str:
    """Join path parts onto a local folder or a URI (s3://bucket/x?query) alike."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def storage_uri(storage_path: str, fs_path: str | None) -> str | None:
    """The URI of `fs_path`, a path Ray reports on `storage_path`'s filesystem."""
    if fs_path is None or not is_uri(storage_path) or is_uri(fs_path):
        return fs_path
    scheme = storage_path.split("://", 1)[0]
    _, sep, query = storage_path.partition("?")
    return f"{scheme}://{fs_path.lstrip('/')}{sep}{query}"


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A folder in storage copied into a temporary local folder (removed afterwards)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        raise UserError(f"no folder at {uri}")
    with tempfile.TemporaryDirectory(prefix="hlbd-fetch-") as tmp:
        pyarrow.fs.copy_files(path, tmp, source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield Path(tmp)


def stuck_storage_calls() -> list[str]:
    """Threads other than this one that are inside a call to S3 storage (pyarrow, or Ray's
    storage and sync helpers), each as "<thread> in <function> (<file>:<line>)"."""
    if "pyarrow._s3fs" not in sys.modules:
        return []
    names = {t.ident: t.name for t in threading.enumerate() if t is not threading.current_thread()}
    return [f"{names[ident]} in {frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
            for ident, frame in sys._current_frames().items()
            if ident in names and any(_storage_code(f) for f in _stack(frame))]


def _stack(frame: FrameType | None) -> Iterator[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def _storage_code(frame: FrameType) -> bool:
    name = frame.f_code.co_filename
    return f"{os.sep}pyarrow{os.sep}" in name or name.endswith(
        (os.path.join("ray", "train", "_internal", "storage.py"), os.path.join("ray", "train", "_internal", "syncer.py")))


def exit_past_stuck_storage_calls(code: int, grace_s: float | None = None) -> None:
    """Once a job's work is done: if S3 calls are still running after `grace_s`, say so
    and exit with `code` now. pyarrow's exit handler waits for every S3 call in flight,
    holding the interpreter, so one request that never returns (by its Ray logs, what hung
    one CI run: Tune's last upload of the experiment state) would keep a finished job alive
    forever."""
    grace_s = STUCK_CALLS_GRACE_S if grace_s is None else grace_s
    deadline = time.monotonic() + grace_s
    while (stuck := stuck_storage_calls()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not stuck:
        return
    print(f"exit: not waiting for {len(stuck)} storage call(s) still running after {grace_s:.0f} s "
          f"({'; '.join(stuck)}); everything this job writes itself is written", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
