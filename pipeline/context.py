"""What every step needs: the config, the gallery, and (lazily) the MLflow tracker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig, UpgradeConfig
from pipeline.gallery.lock import GalleryLock
from pipeline.gallery.store import Gallery


@dataclass
class Context:
    """What every step needs: the config, the gallery, and (lazily) tracking."""

    cfg: UpgradeConfig
    quiet: bool = False
    _tracker: Any = None

    @property
    def gallery(self) -> Gallery:
        return Gallery(self.cfg.gallery_uri, self.cfg.storage)

    @property
    def tracker(self) -> Any:
        if self._tracker is None:
            # start-up: importing mlflow costs ~2 s; commands that never track skip it.
            from pipeline.tracking import Tracker

            self._tracker = Tracker(
                self.cfg.tracking_uri, self.cfg.tracking.experiment, self.cfg.artifact_location
            )
        return self._tracker

    def registry_name(self, kind: str = "embedder") -> str:
        return f"{self.cfg.gallery_name}-{kind}"

    def model_dir(self, model: ModelConfig) -> Path:
        return Path(self.cfg.workdir) / "models" / model.name

    def tags(self, **extra: Any) -> dict[str, str]:
        return {
            "carryover.gallery": self.cfg.gallery_name,
            **{f"carryover.{k}": str(v) for k, v in extra.items()},
        }


def gallery_lock(
    cfg: UpgradeConfig, owner: str, purpose: str, token: str | None = None
) -> GalleryLock:
    """The gallery's lease for whatever writes it (an upgrade, a promote, a schedule tick):
    one holder at a time, its TTL from schedule.lock_ttl_seconds; `token` resumes a lease
    handed over by the holder that started this process."""
    return GalleryLock(
        cfg.gallery_uri,
        cfg.storage,
        cfg.schedule.lock_ttl_seconds,
        owner=owner,
        purpose=purpose,
        token=token,
    )
