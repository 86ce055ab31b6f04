"""The `carryover` command line: one typer app; each module below adds its commands to it."""

from __future__ import annotations

import sys

from pipeline.cli import commands, jobs, publish, serve, status  # noqa: F401  (each registers commands)
from pipeline.cli.common import EXIT_LOCKED, app, err

__all__ = ["EXIT_LOCKED", "app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
