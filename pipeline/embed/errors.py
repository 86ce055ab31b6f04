"""Errors out of Ray tasks: the project's own error, found inside Ray's wrappers, as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ray.exceptions import RayError

from pipeline.data.shards import DataError
from pipeline.io.uri import StorageError
from pipeline.models.store import ModelLoadError

_RAY_DATA_ERROR_LOGGERS = (
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data.exceptions",
)


def user_error(e: BaseException) -> BaseException:
    """The project's own error inside a Ray task failure (a corrupt file, a broken model), so
    that it reaches the user as one line; anything else unchanged."""
    own = _own_error(e)
    if own is None:
        return e
    if own.args and isinstance(own.args[0], str):
        # Ray Data appends its retry advice to a task error's message ("\nFailed to ... after
        # 1/1 attempts ..."): the project's messages are one line, and say what to do.
        own.args = (own.args[0].split("\nFailed to ", 1)[0], *own.args[1:])
    return own


def _own_error(e: BaseException) -> BaseException | None:
    """The project's own error in `e`'s chain of causes (Ray wraps task errors), if any."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, DataError | ModelLoadError | StorageError) and not isinstance(
            cur, RayError
        ):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
    return None


class _HideOwnErrorTraces(logging.Filter):
    """Drops Ray Data's driver log records of a task that failed with the project's own error:
    it logs an error raised inside a generator UDF as an internal one, tracebacks and all,
    while the CLI reports it in one line. Other failures keep their traces."""

    def filter(self, record: logging.LogRecord) -> bool:
        # exceptions.py logs its preamble without exc_info, inside the `except` handling it.
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or _own_error(exc) is None


@contextmanager
def quiet_own_errors() -> Iterator[None]:
    """Install `_HideOwnErrorTraces` on the Ray Data loggers that report task failures."""
    hide = _HideOwnErrorTraces()
    loggers = [logging.getLogger(n) for n in _RAY_DATA_ERROR_LOGGERS]
    for lg in loggers:
        lg.addFilter(hide)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(hide)
