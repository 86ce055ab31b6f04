"""The target interface: a vector database that holds published gallery versions and one name
(a tag, an alias) that serving readers open; target URIs and the gallery's record of them."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from pipeline.config import ConfigError
from pipeline.gallery.store import Gallery, GalleryError
from pipeline.io import uri as uri_io

TARGETS_FILE = "targets.json"
# kind → "<what a URI after kind:// names>"; a new kind adds its line and its `open_target` case
KINDS = {
    "lancedb": "a local path (lancedb:///abs or lancedb://rel) or lancedb://s3://bucket/prefix"
}


@dataclass(frozen=True)
class TargetURI:
    """A parsed `--to` URI: the kind of database and where it is (absolute path or s3://)."""

    kind: str
    location: str

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def __str__(self) -> str:
        return f"{self.kind}://{self.location}"


@dataclass(frozen=True)
class Published:
    """One gallery version written to a target: where, how many rows, its ANN index and the
    search settings tuned on it (readers pass nprobes / refine_factor)."""

    target: str
    table: str
    version: str
    table_version: int
    rows: int
    index_type: str
    partitions: int | None = None
    nprobes: int | None = None
    refine_factor: int | None = None
    recall_at_10: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    published_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TargetInfo:
    """What a target holds now: gallery version → its table version, and the serving one."""

    target: str
    kind: str
    table: str
    serving_tag: str
    versions: dict[str, int]
    serving: str | None


@runtime_checkable
class Target(Protocol):
    """A vector database target. `publish` writes a version where queries are answered (not yet
    served); `point` moves the serving name (None: remove it) in one atomic step of the
    database; `describe` reads what the database holds (never the gallery's record)."""

    uri: TargetURI

    def publish(self, version: str) -> Published: ...

    def point(self, serving: str, version: str | None) -> None: ...

    def describe(self) -> TargetInfo: ...


def parse_target(uri: str) -> TargetURI:
    """`lancedb:///abs`, `lancedb://rel` (made absolute) or `lancedb://s3://bucket/prefix`;
    anything else is a ConfigError naming the URI and what is accepted."""
    kind, sep, rest = (uri or "").partition("://")
    if not sep or kind not in KINDS:
        known = "; ".join(f"{k}://... ({v})" for k, v in KINDS.items())
        raise ConfigError(f"--to {uri!r}: not a publish target URI; expected {known}")
    if "://" in rest:
        scheme, _, path = rest.partition("://")
        bucket = path.split("/", 1)[0]
        if scheme != "s3" or not bucket:
            raise ConfigError(
                f"--to {uri!r}: only s3://bucket[/prefix] can follow {kind}:// (or a local path)"
            )
        return TargetURI(kind, "s3://" + path.rstrip("/"))
    if not rest.strip("/"):
        raise ConfigError(f"--to {uri!r}: names no database path ({KINDS[kind]})")
    if "\x00" in rest or any(ord(c) < 32 for c in rest):
        raise ConfigError(f"--to {uri!r}: control characters in the path")
    return TargetURI(kind, os.path.abspath(rest).rstrip("/") or "/")


def records_uri(g: Gallery) -> str:
    return g.path(TARGETS_FILE)


def read_records(g: Gallery) -> dict[str, dict[str, Any]]:
    """GALLERY/targets.json: target URI → {"kind", "table", "published": {version: Published}}."""
    try:
        data = uri_io.read_json(records_uri(g), g.storage)
    except FileNotFoundError:
        return {}
    targets = data.get("targets") if isinstance(data, dict) else None
    if not isinstance(targets, dict):
        raise GalleryError(f"{records_uri(g)}: no 'targets' mapping; fix or remove the file")
    return targets


def record_published(g: Gallery, p: Published, kind: str) -> None:
    """Add (or replace) one published version in GALLERY/targets.json (atomic object write)."""
    targets = read_records(g)
    entry = targets.setdefault(p.target, {"kind": kind, "table": p.table, "published": {}})
    entry["table"] = p.table
    entry["published"][p.version] = asdict(p)
    uri_io.write_json(records_uri(g), {"targets": targets}, g.storage)
