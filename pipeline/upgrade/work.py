"""ShardWork: one shard's planned upgrade, the planner's output and the executor's input."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ShardWork:
    """The decision for one shard and where its rows and images are: what the executor runs
    and what its commit record names (method, chain, source)."""

    shard_id: int
    method: str
    reembed_rows: int
    source_version: str
    space: str
    rows: int = 0
    fraction: float = 0.0
    transform: list[str] | None = None
    cost_seconds: float = 0.0
    expected_gain: float = 0.0
    reason: str = ""
    images_available: bool = True
    has_side_info: bool = True
    # Which of the upgrade's chains maps this shard's rows ("identity" | "side" | "noside"),
    # or None when no transformation reaches them (a full backfill).
    chain: str | None = None
    source_uri: str = ""
    image_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardWork:
        """Inverse of `to_dict`; fields a record does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ShardSource:
    """Where one shard of the source version is: what the facts scan reads."""

    shard_id: int
    source_version: str
    source_uri: str
    image_file: str | None
    space: str
    chain: str | None = None  # "identity" when the source is already the target space

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardSource:
        """From a ShardSource's or a ShardWork's fields (a ShardWork names its source too)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def id_ranges(ids: list[int], sep: str = ",") -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8": shard ids in a line (or a tag) however many."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return sep.join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
