"""A pytest plugin that fails the session when a test opens a file outside the checkout.

Loaded only by test_fresh_checkout.py (`-p tests.outside_guard`, with ENV set) in a lone
copy of the repository. A Python audit hook sees every open, import and directory listing
of this process (child processes are not watched); a path counts as outside when it lies
beside the copy, in the original checkout or beside it (the venv excepted), or anywhere
that is neither a system folder, the temp folder nor the home folder. The hook goes in at
import, before conftest.py imports hlbd_ray; importing this module without ENV does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ENV = "HLBD_RAY_OUTSIDE_GUARD"  # JSON: {"copy": path, "original": path}
SYSTEM = ("/usr", "/lib", "/lib64", "/etc", "/proc", "/sys", "/dev", "/run", "/var", "/opt")
EVENTS = {"open", "os.listdir", "os.scandir"}


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


class Guard:
    def __init__(self, copy: str, original: str) -> None:
        self.copy = Path(copy).resolve()
        self.venv = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
        # Beside the copy (../shared), and the original checkout with its neighbours.
        self.denied = [self.copy.parent, Path(original).resolve().parent]
        self.allowed = [Path(tempfile.gettempdir()).resolve(), Path.home().resolve(), *map(Path, SYSTEM)]
        self.outside: set[str] = set()
        self.checked = 0

    def is_outside(self, path: Path) -> bool:
        if _under(path, [self.copy, *self.venv]):  # the venv may live inside the original
            return False
        return _under(path, self.denied) or not _under(path, self.allowed)

    def hook(self, event: str, args: tuple) -> None:
        if event not in EVENTS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return  # another event, an open by file descriptor, a listing of the working directory
        self.checked += 1
        path = Path(os.path.realpath(os.fsdecode(args[0])))
        if self.is_outside(path):
            self.outside.add(str(path))


guard = Guard(**json.loads(os.environ[ENV])) if ENV in os.environ else None
if guard:
    sys.addaudithook(guard.hook)


def pytest_terminal_summary(terminalreporter) -> None:
    import hlbd_ray

    if guard is None:
        terminalreporter.write_line(f"outside guard: not active ({ENV} is not set)")
        return
    terminalreporter.write_line(f"outside guard: {guard.checked} paths checked, {len(guard.outside)} "
                                f"outside the copy; hlbd_ray from {hlbd_ray.__file__}")
    for path in sorted(guard.outside):
        terminalreporter.write_line(f"outside the checkout: {path}")


def pytest_sessionfinish(session) -> None:
    if guard is None or guard.outside:
        session.exitstatus = 1
