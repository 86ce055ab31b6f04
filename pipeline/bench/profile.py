"""A measured throughput profile (embed images/s, transform rows/s) the planner's cost model reads.

python -m pipeline.bench.profile OUT.json [--seconds 20]   # measure on this machine, save
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import StorageConfig
from pipeline.io import uri

PROFILE_VERSION = 1
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


def measure_profile(
    batch: int = 16,
    seconds: float = 20.0,
    dim: int = 128,
    side_dim: int = 32,
    rows: int = 200_000,
    scan_rows_per_second: float | None = None,
) -> ThroughputProfile:
    """Measure ResNet-50 images/s and transformation rows/s here, as the "cost" bench does."""
    import torch

    from pipeline.bench.common import machine
    from pipeline.bench.cost import measure_embedder, measure_transformation

    emb = measure_embedder(batch, seconds)
    tr = measure_transformation(dim, side_dim, rows)
    return ThroughputProfile(
        embed_images_per_second=emb.per_second,
        transform_rows_per_second=tr.per_second,
        scan_rows_per_second=scan_rows_per_second,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={**machine(), "torch_threads": torch.get_num_threads()},
        model=f"embed: {emb.info['model']}; transform: {tr.info['model']}",
        extra={
            "embed_batch": batch,
            "transform_batch": tr.info["batch"],
            "embed_flops_per_image": emb.flops_per_item,
            "transform_flops_per_row": tr.flops_per_item,
        },
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="where to write the profile JSON (path or s3:// URI)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    prof = measure_profile(batch=args.batch, seconds=args.seconds)
    prof.save(args.out)
    print(
        f"{args.out}: {prof.embed_images_per_second:.1f} images/s, "
        f"{prof.transform_rows_per_second:.0f} rows/s ({prof.transform_speedup:.0f}x)"
    )
