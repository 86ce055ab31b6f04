"""The planner's prices: a measured throughput profile and the budget it turns into seconds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, PlanConfig, StorageConfig
from pipeline.io import uri
from pipeline.upgrade.plan import TRANSFORM_SPEEDUP, Budget, ShardFacts

DEFAULT_EMBED_RPS = 500.0
PROFILE_VERSION = 1


@dataclass(frozen=True)
class MeasuredRates:
    """This upgrade's own models timed on a sample (pipeline/embed/rates.py): rows per second
    of one process with `embed.torch_threads` threads; None where not measured."""

    embed_images_per_second: float | None
    transform_rows_per_second: float | None
    rows: int = 0

    @property
    def transform_speedup(self) -> float | None:
        """Rows transformed in the time one image is re-embedded."""
        e, t = self.embed_images_per_second, self.transform_rows_per_second
        return t / e if e and t else None


_RATES = ("embed_images_per_second", "transform_rows_per_second", "scan_rows_per_second")


@dataclass
class ThroughputProfile:
    """Rates measured on one machine; `scan_rows_per_second` is None when not measured."""

    embed_images_per_second: float
    transform_rows_per_second: float
    scan_rows_per_second: float | None = None
    measured_at: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _RATES:
            val = getattr(self, name)
            if val is None and name == "scan_rows_per_second":
                continue
            if isinstance(val, bool) or not isinstance(val, int | float):
                raise ValueError(f"throughput profile: {name} must be a number, got {val!r}")
            if not (math.isfinite(val) and val > 0):
                raise ValueError(f"throughput profile: {name} must be finite and > 0, got {val}")
            setattr(self, name, float(val))

    @property
    def transform_speedup(self) -> float:
        """Rows transformed in the time one image is embedded (the planner's TRANSFORM_SPEEDUP)."""
        return self.transform_rows_per_second / self.embed_images_per_second

    def save(self, path: str | Path, storage: StorageConfig | None = None) -> None:
        """Write as JSON to a local path or s3:// URI (atomically)."""
        uri.write_json(str(path), {"version": PROFILE_VERSION, **asdict(self)}, storage)

    @classmethod
    def load(cls, path: str | Path, storage: StorageConfig | None = None) -> ThroughputProfile:
        """Read a saved profile; a missing or wrong field raises ValueError naming it."""
        raw = uri.read_json(str(path), storage)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a throughput profile must be a JSON object")
        if raw.get("version", PROFILE_VERSION) != PROFILE_VERSION:
            raise ValueError(f"{path}: profile version {raw.get('version')!r} is not supported")
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in raw.items() if k in known}
        unknown = sorted(set(raw) - known - {"version"})
        if unknown:
            raise ValueError(f"{path}: unknown throughput profile fields {unknown}")
        try:
            return cls(**fields)
        except TypeError as e:  # a required rate is missing
            raise ValueError(f"{path}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def load_profile(path: str | None) -> ThroughputProfile | None:
    """plan.throughput_profile, or None when unset; unreadable raises ConfigError naming it."""
    if not path:
        return None
    try:
        return ThroughputProfile.load(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"plan.throughput_profile {path!r}: cannot read it: {e}") from None


def price_budget(
    pc: PlanConfig,
    facts: list[ShardFacts],
    source: str,
    source_rps: float | None,
    measured: MeasuredRates | None = None,
) -> tuple[Budget, list[str]]:
    """The configured budget in images and seconds, priced with measured throughputs: embedding
    from plan.embed_rows_per_second, else the new model measured on a sample (`measured`), else
    the source version's ingest (`source_rps`), else the throughput profile; transforming from
    plan.transform_rows_per_second, else the upgrade's h measured, else the profile.

    When h is not plan.min_transform_speedup times faster than the new model, transforming
    does not pay: the image budget is lifted and every shard with images is re-embedded."""
    notes: list[str] = []
    total = sum(f.rows for f in facts)
    caps = [pc.budget_images] if pc.budget_images is not None else []
    if pc.budget_fraction is not None:
        caps.append(int(round(pc.budget_fraction * total)))
    profile = load_profile(pc.throughput_profile)
    measured = measured or MeasuredRates(None, None, 0)
    rps = pc.embed_rows_per_second or measured.embed_images_per_second or source_rps
    rps = rps or (profile.embed_images_per_second if profile else None)
    if not rps:
        rps = DEFAULT_EMBED_RPS
        notes.append(f"no measured embedding throughput for {source}: assuming {rps:.0f} rows/s")
    trps = pc.transform_rows_per_second or measured.transform_rows_per_second
    trps = trps or (profile.transform_rows_per_second if profile else None)
    pays = not trps or trps >= pc.min_transform_speedup * rps
    if not pays:
        caps = []
        notes.append(
            f"h transforms {trps:,.0f} rows/s and the new model embeds {rps:,.0f} images/s "
            f"(measured): transforming is not {pc.min_transform_speedup:g}× cheaper "
            "(plan.min_transform_speedup), so every shard with images is re-embedded"
        )
    if not trps and pc.budget_seconds is not None:
        notes.append(
            "no measured transformation throughput (plan.throughput_profile): a transform is "
            f"priced at 1/{TRANSFORM_SPEEDUP:.0f} of an embedding"
        )
    budget = Budget(
        images=min(caps) if caps else None,
        seconds=pc.budget_seconds,
        embed_rows_per_second=float(rps),
        scan_rows_per_second=pc.scan_rows_per_second,
        transform_rows_per_second=float(trps) if trps else None,
        origin=_budget_origin(pc, total),
        transform_pays=pays,
    )
    return budget, notes


def _budget_origin(pc: PlanConfig, total: int) -> str:
    """The settings that set the budget, as a user would write them."""
    out = [f"plan.budget_fraction={pc.budget_fraction} of {total:,} rows"]
    out = out if pc.budget_fraction is not None else []
    out += [f"plan.budget_images={pc.budget_images}"] if pc.budget_images is not None else []
    out += [f"plan.budget_seconds={pc.budget_seconds}"] if pc.budget_seconds is not None else []
    return ", ".join(out)
