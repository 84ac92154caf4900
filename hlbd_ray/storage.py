"""Paths in Ray's storage: a local folder or a URI pyarrow understands, query included.

`storage_path=s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http` is how
pyarrow (`FileSystem.from_uri`) and so Ray Train and Tune take an S3-compatible server;
the query configures the filesystem, so paths are joined before it, never after.
Ray reports checkpoint paths on that filesystem ("bucket/runs/..."): `storage_uri`
turns one back into a URI another process can open.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hlbd_ray.errors import UserError


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
