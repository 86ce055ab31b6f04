"""A small job graph: named stages with declared inputs, completion records, resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from pipeline.gallery.store import Gallery
from pipeline.io import uri as uri_io


@dataclass(frozen=True)
class StageRun:
    """What the engine hands a running stage: its own MLflow run and the graph's parent run
    (None when no tracking run is open: a unit test, a graph run without tracking)."""

    run: Any = None
    parent: Any = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None

    def log_dict(self, obj: Any, name: str) -> None:
        """An artifact in the stage's run and in the parent's (the upgrade's summary)."""
        for r in {id(x): x for x in (self.run, self.parent) if x is not None}.values():
            r.log_dict(obj, name)


@dataclass(frozen=True)
class Stage:
    """One node: `run(inputs, stage_run)` gets the outputs of `needs` by name and the stage's
    tracking run, and returns JSON-able output.

    `remember=False` stages run every time (they are cheap, or must re-check the world).
    """

    name: str
    run: Callable[[dict[str, Any], StageRun], Any]
    needs: tuple[str, ...] = ()
    remember: bool = True
    doc: str = ""


class StageLog:
    """Completion records of the stages building one gallery version, stored beside it
    (`versions/<v>/_graph/<stage>.json`): a rerun reads them and skips finished stages."""

    def __init__(self, gallery: Gallery, version: str):
        self.g, self.base = gallery, gallery.path("versions", version, "_graph")

    def uri(self, name: str) -> str:
        return uri_io.join(self.base, f"{name}.json")

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return uri_io.read_json(self.uri(name), self.g.storage)
        except FileNotFoundError:
            return None

    def put(self, name: str, record: dict[str, Any]) -> None:
        uri_io.write_json(self.uri(name), record, self.g.storage)

    def done(self) -> list[str]:
        return [n[:-5] for n in uri_io.list_dir(self.base, self.g.storage) if n.endswith(".json")]


class GraphError(ValueError):
    """The graph itself is malformed (a stage needs one that does not run before it)."""


def check_order(stages: list[Stage]) -> None:
    """Every stage's inputs are produced by stages listed before it (a topological order)."""
    seen: set[str] = set()
    for s in stages:
        missing = [n for n in s.needs if n not in seen]
        if missing:
            raise GraphError(f"stage {s.name!r} needs {missing}, which do not run before it")
        if s.name in seen:
            raise GraphError(f"stage {s.name!r} appears twice")
        seen.add(s.name)


OpenRun = Callable[[Stage], AbstractContextManager[StageRun]]


def no_run(stage: Stage) -> AbstractContextManager[StageRun]:
    """Stages run without a tracking run of their own."""
    return nullcontext(StageRun())


def run_stages(
    stages: list[Stage],
    log: StageLog,
    on_event: Callable[[str, str, float], None] = lambda name, event, secs: None,
    until: str | None = None,
    open_run: OpenRun = no_run,
) -> dict[str, Any]:
    """Run stages in order, skipping those with a completion record; stop after `until`.

    Events: ("start", 0), ("done", seconds), ("resumed", seconds of the original run).
    `open_run(stage)` opens the stage's tracking run around it; its id goes into the record.
    """
    check_order(stages)
    if until is not None and until not in {s.name for s in stages}:
        raise GraphError(f"--until {until!r}: no such stage; stages: {[s.name for s in stages]}")
    results: dict[str, Any] = {}
    for s in stages:
        rec = log.get(s.name) if s.remember else None
        if rec is not None:
            results[s.name] = rec["output"]
            on_event(s.name, "resumed", float(rec.get("seconds", 0.0)))
        else:
            on_event(s.name, "start", 0.0)
            t0 = time.perf_counter()
            with open_run(s) as handle:
                out = s.run({n: results[n] for n in s.needs}, handle)
            secs = round(time.perf_counter() - t0, 3)
            if s.remember:
                run_id = {"run_id": handle.run_id} if handle.run_id is not None else {}
                rec = {"stage": s.name, "output": out, "seconds": secs, "finished_at": time.time()}
                log.put(s.name, {**rec, **run_id})
            results[s.name] = out
            on_event(s.name, "done", secs)
        if s.name == until:
            break
    return results
