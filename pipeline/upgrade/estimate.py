"""The whole upgrade priced both ways before anything is trained: transforming (side-info
training, training pairs, h's training, the transform pass, the budgeted re-embedding) against
re-embedding every image with the new model. Pure arithmetic over measured rates."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class UpgradeCosts:
    """What the estimate multiplies: row counts, epochs, and rates (rows/s, one process)."""

    gallery_rows: int
    train_pairs: int  # (old, side, new) rows h trains on
    budget_rows: int  # rows the transform path still re-embeds (the plan's budget)
    new_images_per_second: float
    old_images_per_second: float  # the training pairs need old embeddings of the train split
    side_images_per_second: float | None  # None: no side-info
    side_train_images_per_second: float | None  # None: side-info trained already, or none
    side_train_images: int
    side_epochs: int
    h_train_rows_per_second: float
    h_epochs: int
    h_rows_per_second: float  # transforming stored rows
    ingest_side_info: bool = False  # the stored gallery has no side-info: one more pass


@dataclass(frozen=True)
class UpgradeEstimate:
    """Seconds of each path and of each part of the transform path."""

    full_seconds: float
    transform_seconds: float
    parts: dict[str, float]

    @property
    def cheaper(self) -> str:
        return "transform" if self.transform_seconds < self.full_seconds else "full backfill"

    def to_dict(self) -> dict:
        return {**asdict(self), "cheaper": self.cheaper}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {_secs(v)}" for k, v in self.parts.items() if v)
        return (
            f"estimate: transform path {_secs(self.transform_seconds)} ({parts}) vs full "
            f"backfill {_secs(self.full_seconds)}: {self.cheaper} is cheaper"
        )


def _secs(v: float) -> str:
    return f"{v:,.1f} s" if v < 10 else f"{v:,.0f} s"


def estimate_upgrade(c: UpgradeCosts) -> UpgradeEstimate:
    """Both paths' compute seconds (one process; a cluster divides both alike)."""
    pair_cost = 1 / c.new_images_per_second + 1 / c.old_images_per_second
    parts = {"side-info training": 0.0, "side-info pass": 0.0}
    if c.side_images_per_second:
        pair_cost += 1 / c.side_images_per_second
        if c.side_train_images_per_second:
            parts["side-info training"] = (
                c.side_epochs * c.side_train_images / c.side_train_images_per_second
            )
        if c.ingest_side_info:
            parts["side-info pass"] = c.gallery_rows / c.side_images_per_second
    parts["training pairs"] = c.train_pairs * pair_cost
    parts["h training"] = c.h_epochs * c.train_pairs / c.h_train_rows_per_second
    parts["transform"] = c.gallery_rows / c.h_rows_per_second
    parts["re-embed budget"] = c.budget_rows / c.new_images_per_second
    return UpgradeEstimate(
        full_seconds=c.gallery_rows / c.new_images_per_second,
        transform_seconds=sum(parts.values()),
        parts={k: round(v, 2) for k, v in parts.items()},
    )
