"""Closed sets of names shared by the code and the CLI (whose --help lists them): one place each.

Nothing heavy is imported here: the CLI builds its choices from these at start-up."""

from __future__ import annotations

from typing import Literal, get_args

AdapterKind = Literal["procrustes", "low_rank", "residual_mlp"]
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)  # query adapters (models/compat.py)
SHARD_ORDERS = ("shuffle", "label")  # how `data prepare` orders rows into shards
TRAIN_TARGETS = ("old", "new", "side-info", "transformation")  # `carryover train --which`
# The upgrade graph's stages in order (upgrade_graph.UpgradeStages.graph names them the same;
# tests/unit/test_cli_conventions.py checks it): what `upgrade --until` accepts.
UPGRADE_STAGES = (
    "old-model",
    "side-info",
    "ingest",
    "new-model",
    "transformation",
    "evaluate",
    "plan",
    "execute",
    "index",
    "validate",
    "promote",
)
