"""What every benchmark section returns: figures measured beside their baselines, in one run."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import torch


@dataclass
class Figure:
    """One measured figure and, where it has one, the baseline measured in the same run.

    `target` is the ratio value/baseline the figure must reach (`higher_is_better`), or must
    stay under (lower is better, e.g. memory). `met` is None when there is no target. `note`
    says what was measured and, where the section can, the profile behind the figure."""

    section: str
    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    tried: str = ""  # what the path already does to reach its target (shown when it misses)

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """`with stopwatch() as elapsed: ...; secs = elapsed()` (wall seconds, perf_counter)."""
    t0 = time.perf_counter()
    end: list[float] = []
    try:
        yield lambda: (end[0] if end else time.perf_counter()) - t0
    finally:
        end.append(time.perf_counter())


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The fastest of `repeat` wall-clock runs of fn (seconds): the least disturbed one."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare figures across machines."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = None
    with suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "ray": ray.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
