"""What every `carryover` command shares: the typer apps, consoles, options and error mapping."""

from __future__ import annotations

import enum
import functools
import json
import math
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
    add_completion=True,
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
# Positional arguments name their metavar: typer would print `{version}` in the usage line.
VersionArg = Annotated[
    str, typer.Argument(metavar="VERSION", help="a gallery version (`carryover versions`)")
]
JobIdArg = Annotated[
    str, typer.Argument(metavar="JOB_ID", help="a submission id (`carryover jobs list`)")
]
GalleryArg = Annotated[
    str | None,
    typer.Argument(metavar="GALLERY", help="gallery URI (default: the config's `gallery`)"),
]
GalleryAliasOpt = Annotated[
    str | None, typer.Option("--gallery", hidden=True, help="deprecated: give GALLERY instead")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="one JSON object on one line on stdout, for scripts")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do it without asking")]
EXIT_LOCKED = 3


def choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """A str Enum of `values` (a closed set from pipeline/choices.py): --help lists them and a
    wrong value exits 2 naming them. `.value` is the plain string."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def _plain(obj: Any) -> Any:
    """Strict JSON values: NaN and infinities become null (a parser in another language would
    refuse them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def emit_json(obj: dict[str, Any]) -> None:
    """A --json answer: exactly one JSON object on one line on stdout (nothing else goes to
    stdout in JSON mode; notices go to stderr)."""
    text = json.dumps(obj, default=str)  # dates, paths
    sys.stdout.write(json.dumps(_plain(json.loads(text)), allow_nan=False) + "\n")
    sys.stdout.flush()


def confirm(action: str, yes: bool) -> None:
    """A destructive command goes on with --yes, or once a person at a terminal says yes; off
    a terminal without --yes it refuses (exit 2) rather than wait for an answer never coming."""
    if yes:
        return
    if not sys.stdin.isatty():
        err.print(
            f"[bold red]error:[/] {escape(action)}: pass --yes (stdin is not a terminal)",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    if not typer.confirm(f"{action}?", default=False, err=True):
        err.print("nothing done")
        raise typer.Exit(1)


def pick_gallery(arg: str | None, alias: str | None) -> str | None:
    """GALLERY, or the deprecated --gallery option (both: they must agree)."""
    if arg and alias and arg != alias:
        raise ConfigError(f"GALLERY {arg!r} and --gallery {alias!r} disagree: give GALLERY only")
    if alias and not arg:
        err.print("note: --gallery is deprecated; give GALLERY as the last argument")
    return arg or alias


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


def _target_cfg(
    config: Path | None, sets: list[str] | None, gallery: str | None, require: bool = False
) -> UpgradeConfig:
    """The config of a command that may create or extend a gallery: with GALLERY, the
    gallery's own identity is adopted (as `_gallery_cfg`); without it, the config's."""
    if gallery is None:
        return _cfg(config, sets)
    return _gallery_cfg(config, sets, gallery, require=require)[0]


def _ctx(cfg: UpgradeConfig, quiet: bool = False):
    # start-up: pyarrow (~0.1 s, a third of what --help takes)
    from pipeline.context import Context

    return Context(cfg, quiet=quiet)
