"""Shared command-line surface of the jobs: `--config PATH` plus OmegaConf dotlist overrides."""

from __future__ import annotations

import argparse
from typing import NoReturn

from hlbd_ray.config import CONF_DIR, Config, load_config
from hlbd_ray.errors import UserError


class JobParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line, exit 2, like every bad input)."""

    def error(self, message: str) -> NoReturn:
        # argparse would exit 2 itself; raising keeps one path for every user error.
        raise UserError(message)


def parse_job_args(argv: list[str], default_config: str, description: str) -> Config:
    parser = JobParser(description=description)
    parser.add_argument("--config", default=str(CONF_DIR / default_config),
                        help=f"YAML config (default: conf/{default_config})")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)

