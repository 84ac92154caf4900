"""The published HLBD files shipped with the package, and their short names.

The JSON files beside this module are package data (MIT, see LICENSE here): `pip install`
puts them next to the code, so `data.paths=[hlbd:full]` resolves to the same files from
any working directory, inside `ray job submit` and in the Docker image.
"""

from __future__ import annotations

from pathlib import Path

from hlbd_ray.errors import UserError

PREFIX = "hlbd:"
FOLDER = Path(__file__).resolve().parent
FILES = {
    "full": "HLBD_Full_V2.json",                 # HLBD Full V2: 5,000 concept samples
    "hardcore": "HLBD_Hardcore_Full_V2.json",    # HLBD Hardcore V2: 5,042 pairs in 5 modules
    "hardcore_v1": "HLBD_Hardcore_Full.json",    # the older Hardcore file: 575 pairs
}


def resolve(path: str) -> str:
    """The absolute path of a data file: `hlbd:<name>` is a shipped file, anything else a path."""
    if not path.startswith(PREFIX):
        return str(Path(path).expanduser().absolute())
    name = path[len(PREFIX):]
    if name not in FILES:
        known = ", ".join(PREFIX + known for known in FILES)
        raise UserError(f"unknown data name {path!r}: the shipped files are {known}")
    return str(FOLDER / FILES[name])
