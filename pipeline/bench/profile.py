"""A measured throughput profile (embed images/s, transform rows/s) the planner's cost model reads.

python -m pipeline.bench.profile OUT.json [--seconds 20]   # measure on this machine, save
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import torch

from pipeline.bench.common import machine
from pipeline.bench.cost import measure_embedder, measure_transformation
from pipeline.upgrade.price import ThroughputProfile


def measure_profile(
    batch: int = 16,
    seconds: float = 20.0,
    dim: int = 128,
    side_dim: int = 32,
    rows: int = 200_000,
    scan_rows_per_second: float | None = None,
) -> ThroughputProfile:
    """Measure ResNet-50 images/s and transformation rows/s here, as the "cost" bench does."""
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
