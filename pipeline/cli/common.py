"""What every `carryover` command shares: the typer apps, consoles, options and error mapping."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.config import ConfigError, UpgradeConfig, load_config

app = typer.Typer(
    help="carryover: upgrade the embedding model behind an image gallery on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Image shards: prepare Parquet shards from datasets.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
jobs_app = typer.Typer(
    help="Jobs on a Ray cluster (and local ones) with the gallery's journal of submissions "
    "and scheduler ticks.",
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs")
lock_app = typer.Typer(help="The gallery's upgrade lock.", no_args_is_help=True)
app.add_typer(lock_app, name="lock")
# Off a terminal (CI logs, `ray job logs`) rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="upgrade YAML config")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="override a config key, e.g. --set new_model.train.epochs=3 (repeatable)",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Ray job API, http://HEAD:8265 (else ray.submit_address or RAY_API_SERVER_ADDRESS; "
        "unset: run here on a local Ray)",
    ),
]
TokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="Ray auth token file (else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    ),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        "-e",
        help="KEY=VALUE for the job's environment, or KEY to forward this shell's value "
        "(values are never printed; prefer the cluster's own secrets for credentials)",
    ),
]
GalleryArg = Annotated[
    str | None, typer.Argument(help="gallery URI (default: the config's `gallery`)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object on stdout, for scripts")]
EXIT_LOCKED = 3


def _say_error(label: str, style: str, e: BaseException) -> None:
    """One line on stderr, never wrapped (a log grep finds the whole message) and never read
    as markup (messages quote lists and paths in brackets)."""
    err.print(f"[{style}]{label}:[/] {escape(str(e))}", soft_wrap=True)


# The project's error types by module: an error of one was raised by code that imported it,
# so the mapping looks them up in sys.modules and never imports torch or Ray itself (a
# command that reads records, `carryover status`, starts in well under a second).
_BAD_INPUT = (
    ("pipeline.data.shards", "DataError"),
    ("pipeline.models.store", "ModelLoadError"),
    ("pipeline.upgrade.plan", "PlanError"),
    ("pipeline.graph.dag", "GraphError"),
)
_LOCKED = (("pipeline.gallery.lock", "LockHeld"),)
_FAILED = (
    ("pipeline.gallery.store", "GalleryError"),
    ("pipeline.io.uri", "StorageError"),
    ("pipeline.ops.jobs", "JobsError"),
    ("pipeline.runtime", "RayStartError"),
)


def _is(e: BaseException, names: tuple[tuple[str, str], ...]) -> bool:
    for module, cls in names:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, getattr(mod, cls)):
            return True
    return False


def _errors(fn):
    """Map known failures to one clear line and a meaningful exit code (2 = bad input)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:
            # LockHeld is a GalleryError: it is looked at first
            if _is(e, _LOCKED):
                _say_error("locked", "bold yellow", e)
                raise typer.Exit(EXIT_LOCKED) from None
            if isinstance(e, ConfigError | FileNotFoundError) or _is(e, _BAD_INPUT):
                _say_error("error", "bold red", e)
                raise typer.Exit(2) from None
            if _is(e, _FAILED):
                _say_error("error", "bold red", e)
                raise typer.Exit(1) from None
            if type(e).__name__ == "TrackingError":
                _say_error("tracking error", "bold red", e)
                raise typer.Exit(1) from None
            raise

    return wrapper


def _cfg(config: Path | None, sets: list[str] | None, gallery: str | None = None) -> UpgradeConfig:
    cfg = load_config(config, sets)
    if gallery:
        cfg.gallery = gallery
    return cfg


def _gallery_cfg(
    config: Path | None,
    sets: list[str] | None,
    gallery: str | None = None,
    require: bool = True,
    uses_tracking: bool = True,
) -> tuple[UpgradeConfig, Any]:
    """The config of a command on a gallery, with the gallery's identity: its name and MLflow
    as its manifests record them (a -c/--set that disagrees: exit 2); "no gallery at PATH"
    (when `require`) before anything is read, locked or created."""
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.gallery.identity import adopt_identity, given_keys

    cfg = _cfg(config, sets, gallery)
    given = given_keys(config is not None, sets)
    return cfg, adopt_identity(cfg, given, require, uses_tracking)


def _ctx(cfg: UpgradeConfig, quiet: bool = False):
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.context import Context

    return Context(cfg, quiet=quiet)
