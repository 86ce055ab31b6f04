"""Ray runtime: connect to a cluster address or start a local Ray, quietly and once."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RayConfig

log = logging.getLogger(__name__)
# Libraries whose log lines belong in the log file, never between our progress bars.
ROUTED_LOGGERS = ("ray", "mlflow", "alembic", "py.warnings", "urllib3", "filelock", "fsspec")
_log_handler: logging.Handler | None = None


class RayStartError(RuntimeError):
    """Ray could not be started (or reached) after the configured retries; the message says
    how to point `ray.address` at a running Ray instead."""


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray if needed: `cfg.address` (or RAY_ADDRESS) or a local instance."""
    # start-up: ray costs ~0.4 s to import and ray.data ~0.5 s more; every CLI command imports
    # this module (for RayStartError) and most never start Ray.
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    # Ray Data's own progress bars would fight with ours; warnings only from Ray's loggers.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train's controller polls its workers every 2 s by default; each start-up phase and
    # the end of a run wait for a poll. At 0.25 s a small fit takes ~5 s less (20 s vs 26 s
    # measured on 2 cores); the polls cost nothing noticeable. Propagated to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Worker logs are noisy (Ray Train's controller polling); errors still reach the driver as
    # exceptions. CARRYOVER_RAY_LOGS=1 forwards them for debugging.
    kwargs: dict = {
        "logging_level": logging.WARNING,
        "log_to_driver": os.environ.get("CARRYOVER_RAY_LOGS") == "1",
    }
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        # "local": always a fresh Ray of our own. A bare ray.init() would join any cluster a
        # `ray start` left on this machine (another user's, or a stopped test's).
        kwargs.update(address="local", num_cpus=cfg.num_cpus, include_dashboard=False)
    _init_with_retries(cfg, address, kwargs)
    from ray.data import DataContext  # start-up: as above

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    route_logs()  # ray.init configures its loggers' console handlers again
    _route_driver_messages()


def _route_driver_messages() -> None:
    """Ray's driver prints the cluster's error messages ("(raylet) WARNING: ... worker
    processes have been started") straight to sys.stdout from a thread of its own, whatever
    log_to_driver says; with a log file set up they go to the file, through a logger."""
    # start-up: see ensure_ray
    import ray._private.worker as ray_worker

    if _log_handler is None or not hasattr(ray_worker, "print_to_stdstream"):
        return
    to_log = logging.getLogger("ray.driver_messages")

    def print_to_stdstream(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines") or []:
            to_log.warning("(%s) %s", data.get("pid"), line)

    ray_worker.print_to_stdstream = print_to_stdstream


@contextmanager
def native_stderr_to(path: Path | None) -> Iterator[None]:
    """Ray's C++ core (in this process and in the raylet it starts) writes its log lines to
    file descriptor 2, past Python's logging (one is an error-level `core_worker.cc` line on a
    healthy Ray Data run): point fd 2 at the log file meanwhile, and keep Python's own
    `sys.stderr` (our error lines, tracebacks) on the terminal."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    before = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr.close()
        sys.stderr = before


def route_logs(path: str | Path | None = None) -> Path | None:
    """Send the loggers of Ray, MLflow and their helpers (and Python warnings) to one file,
    taking their console handlers away; `path` the first time, later calls (after a library
    was imported and set up its own handlers) sweep again. Returns the file, if any."""
    global _log_handler
    if path is not None and _log_handler is None:
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        _log_handler = logging.FileHandler(p, encoding="utf-8")
        _log_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.captureWarnings(True)
    if _log_handler is None:
        return None
    names = [n for n in list(logging.root.manager.loggerDict) if _routed(n)]
    for name in {*ROUTED_LOGGERS, *names}:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if _is_console(h):
                lg.removeHandler(h)
        if "." not in name or not lg.propagate:  # a child that propagates reaches the file
            if _log_handler not in lg.handlers:
                lg.addHandler(_log_handler)
            lg.propagate = False
    return Path(_log_handler.baseFilename)


def _routed(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in ROUTED_LOGGERS)


def _is_console(h: logging.Handler) -> bool:
    stream = getattr(h, "stream", None)
    return not isinstance(h, logging.FileHandler) and stream in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _init_with_retries(cfg: RayConfig, address: str | None, kwargs: dict) -> None:
    """ray.init, retried with exponential backoff: a local raylet that timed out at start-up
    on a loaded machine usually starts on a later try."""
    import ray  # start-up: see ensure_ray

    attempts = cfg.start_retries + 1
    for i in range(attempts):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # Ray raises bare Exception, OSError, ConnectionError ...
            last = e
            ray.shutdown()  # a half-made connection would make the next ray.init a no-op
            if i + 1 == attempts:
                break
            delay = cfg.start_backoff_seconds * 2**i
            log.warning(
                "Ray start-up failed (attempt %d/%d: %s); retrying in %.1fs",
                i + 1,
                attempts,
                _first_line(e),
                delay,
            )
            time.sleep(delay)
    raise RayStartError(_start_advice(address, attempts, last)) from last


def _start_advice(address: str | None, attempts: int, last: BaseException) -> str:
    """One line: what failed, and how to run against a Ray started beforehand."""
    if address:
        return (
            f"could not connect to Ray at {address} ({attempts} attempts; last: "
            f"{_first_line(last)}); check that a Ray runs there (`ray status --address "
            f"{address}`) and that ray.address (or RAY_ADDRESS) names it"
        )
    return (
        f"could not start a local Ray ({attempts} attempts; last: {_first_line(last)}); on a "
        "busy machine start one first (`ray start --head`) and point ray.address at it "
        "(--set ray.address=auto, or RAY_ADDRESS), or raise ray.start_retries and "
        "ray.start_backoff_seconds"
    )


@dataclass
class Timer:
    """Accumulates named durations (read / compute / write ...) for a stage's report."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}_seconds": round(v, 3) for k, v in self.seconds.items()}
