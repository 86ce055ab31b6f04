"""Entrypoint submitted to Ray: one planned upgrade from a config (`--config` + `--set`)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from pipeline.config import ConfigError, UpgradeConfig, load_config
from pipeline.flows import print_summary, run_upgrade, write_report


def main(cfg: UpgradeConfig, report: str | None = None) -> int:
    console = Console(width=None if sys.stdout.isatty() else 120)
    rep = run_upgrade(cfg, quiet=not console.is_terminal, console=console)
    print_summary(rep, console)
    if report:
        write_report(rep, report)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", "-c", help="upgrade YAML")
    ap.add_argument("--set", "-s", action="append", default=[], help="key=value override")
    ap.add_argument("--report", help="write the JSON report here")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(cfg, args.report))
