"""Entrypoint: the embedded demo (digits, v1 on classes 0-4 → v2 on all), ending in a summary."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from pipeline.flows import run_demo


def main(workdir: str, overrides: list[str]) -> int:
    console = Console(width=None if sys.stdout.isatty() else 120)
    run_demo(workdir, overrides, console)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=".carryover-demo")
    ap.add_argument("--set", "-s", action="append", default=[], help="key=value override")
    args = ap.parse_args()
    raise SystemExit(main(args.workdir, args.set))
