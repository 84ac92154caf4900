"""Render a sweep's report: PNG plots and a static index.html that opens with no server.

    python jobs/report.py runs/sweep          # the experiment folder (or its report/)

Works while the sweep is still running: it reads the live files, which the aggregator
replaces atomically. Exit code 2 with one line when the folder holds no report.
"""

from __future__ import annotations

import argparse
import sys

from hlbd_ray.errors import EXIT_OK, run_cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="experiment folder holding report/")
    args = parser.parse_args(argv)
    # Imported here so `--help` answers without loading pyarrow and matplotlib.
    from hlbd_ray.render import render_report

    index = render_report(args.experiment)
    print(f"report: {index}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_cli(main))
