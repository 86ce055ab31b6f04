"""Runs a shard stage over typed work items on a Ray Data actor pool, one block per shard."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import ray.data

from pipeline.embed.errors import quiet_own_errors, user_error


def run_shards(
    stage: type,
    kwargs: dict[str, Any],
    work: list[Any],
    num_cpus: float,
    parallel: int,
) -> Iterator[dict[str, Any]]:
    """Run a shard stage over work items (frozen dataclasses, sent as JSON) on a Ray Data actor
    pool; yield each shard's record as it completes. One block per shard, so shards really run
    in parallel."""
    if not work:
        return
    items = [{"work": json.dumps(asdict(w))} for w in work]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(parallel, len(items)))),
    )
    try:
        with quiet_own_errors():
            for row in ds.iter_rows():
                yield json.loads(row["record"])
    except Exception as e:  # a corrupt image file, a broken model: one line, not a Ray trace
        raise user_error(e) from None
