"""Entrypoint submitted to Ray: one planned upgrade from a config (`--config` + `--set`).

Exit codes: 0 upgraded, 1 failed (validation, storage, a stage's error), 2 bad config or
missing input, 3 the gallery is locked by another upgrade."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Submitted jobs run from a copy of the package: make it importable however we are started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from pipeline.config import ConfigError, UpgradeConfig, load_config  # noqa: E402
from pipeline.flows import print_summary, run_upgrade, write_report  # noqa: E402
from pipeline.gallery.lock import LockHeld  # noqa: E402
from pipeline.gallery.store import GalleryError  # noqa: E402


def main(cfg: UpgradeConfig, report: str | None = None) -> int:
    console = Console(width=None if sys.stdout.isatty() else 120)
    try:
        rep = run_upgrade(cfg, quiet=not console.is_terminal, console=console)
    except LockHeld as e:
        console.print(f"locked: {e}")
        return 3
    except (ConfigError, FileNotFoundError) as e:
        console.print(f"error: {e}")
        return 2
    except GalleryError as e:
        console.print(f"error: {e}")
        return 1
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
