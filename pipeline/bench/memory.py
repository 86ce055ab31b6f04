"""Peak memory of a process tree (the driver and everything it started: a local Ray's raylet,
workers and actors), sampled from /proc while a benchmark runs.

Proportional set size (PSS) is summed, not RSS: Ray's object store is shared memory mapped by
many processes, and RSS would count it once per process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 if it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_pss(root: int | None = None) -> int:
    return sum(pss_bytes(p) for p in tree(root or os.getpid()))


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.peak` (bytes): the largest sampled total PSS of
    this process's tree; `m.start` is the total when sampling began."""

    def __init__(self, interval: float = 0.25, root: int | None = None) -> None:
        self.interval, self.root = interval, root or os.getpid()
        self.start = self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss(self.root))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = tree_pss(self.root)
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.peak = max(self.peak, tree_pss(self.root))


def wait_settled(seconds: float = 1.0) -> None:
    """Let exiting workers go before the next measurement starts."""
    time.sleep(seconds)
