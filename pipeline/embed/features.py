"""Paired features: several models' embeddings of the same images, for compat training and eval."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import torch

from pipeline.compat.augment import simclr_augment
from pipeline.config import EmbedConfig, StorageConfig
from pipeline.data.decode import decode_batch
from pipeline.models.store import ModelBlob, build_model, check_output_dim, model_output
from pipeline.train.embedder import image_dataset


class FeatureStage:
    """Ray Data actor: decode once per preprocess, embed with every model.

    With `augment_copies` > 0 each image also yields that many augmented views (the same view
    through every model): FCT trains its transformation on augmented images. Unlabelled rows
    are dropped (evaluation needs labels) unless `labelled_only` is False: they come with
    label -1 (h's training needs none).
    """

    def __init__(
        self,
        blobs: dict[str, ModelBlob],
        max_pixels: int,
        threads: int = 1,
        augment_copies: int = 0,
        seed: int = 0,
        labelled_only: bool = True,
    ):
        torch.set_num_threads(threads)
        self.labelled_only = labelled_only
        self.blobs = blobs
        self.models = {}
        for name, blob in blobs.items():
            self.models[name] = build_model(blob)
            check_output_dim(self.models[name], blob)
        self.max_pixels, self.copies = max_pixels, augment_copies
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded: dict[str, dict[str, np.ndarray]] = {}
        for blob in self.blobs.values():
            k = blob.preprocess.model_dump_json()
            if k not in decoded:
                decoded[k] = decode_batch(batch, blob.preprocess, self.max_pixels)
        ok = np.logical_and.reduce([d["error"] == "" for d in decoded.values()])
        labels = np.asarray(batch["label"], dtype=np.float64)
        if self.labelled_only:
            ok &= ~np.isnan(labels)
        labels = np.where(np.isnan(labels), -1.0, labels)
        out: dict[str, list[np.ndarray]] = {"key": [], "label": [], "view": []}
        views = [self._views(decoded, ok, v) for v in range(1 + self.copies)]
        for v, xs in enumerate(views):
            out["key"].append(np.asarray(batch["key"])[ok])
            out["label"].append(labels[ok].astype(np.int64))
            out["view"].append(np.full(int(ok.sum()), v, dtype=np.int64))
            for name, x in xs.items():
                with torch.inference_mode():
                    emb = model_output(self.models[name](x), len(x), self.blobs[name])
                out.setdefault(name, []).append(emb)
        return {k: np.concatenate(v) for k, v in out.items()}

    def _views(
        self, decoded: dict[str, dict[str, np.ndarray]], ok: np.ndarray, view: int
    ) -> dict[str, torch.Tensor]:
        """Each model's input tensor for one view (view 0 = the image itself)."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
        xs = {}
        for name, blob in self.blobs.items():
            p = blob.preprocess
            pix = decoded[p.model_dump_json()]["pixels"][ok]
            x = torch.from_numpy(np.ascontiguousarray(pix)).view(
                -1, p.channels, p.input_size, p.input_size
            )
            if view > 0:  # the same seed per view: every model sees the same augmentation
                x = simclr_augment(x, generator=torch.Generator().manual_seed(seed), strength=0.5)
            xs[name] = x
        return xs


def _keep_split(batch: dict[str, np.ndarray], split: str | None, classes: list[int] | None):
    keep = np.ones(len(batch["key"]), dtype=bool)
    if split is not None:
        keep &= batch["split"] == split
    if classes is not None:
        keep &= np.isin(batch["label"], classes)
    return {k: v[keep] for k, v in batch.items()}


def paired_features(
    images_uri: str,
    blobs: dict[str, ModelBlob],
    embed_cfg: EmbedConfig,
    storage: StorageConfig | None = None,
    split: str | None = "train",
    classes: list[int] | None = None,
    augment_copies: int = 0,
    seed: int = 0,
    labelled_only: bool = True,
) -> Any:
    """A Ray Dataset of key, label, view and one (n, d) column per model, for one split."""
    ds = image_dataset(images_uri, storage, columns=["key", "image", "label", "split"])
    ds = ds.map_batches(_keep_split, fn_kwargs={"split": split, "classes": classes}, num_cpus=0.25)
    return ds.map_batches(
        FeatureStage,
        fn_constructor_kwargs={
            "blobs": blobs,
            "max_pixels": embed_cfg.max_decoded_pixels,
            "threads": embed_cfg.torch_threads,
            "augment_copies": augment_copies,
            "seed": seed,
            "labelled_only": labelled_only,
        },
        batch_size=embed_cfg.batch_size,
        num_cpus=embed_cfg.actor_num_cpus,
        compute=ray.data.ActorPoolStrategy(size=embed_cfg.num_actors),
    )


def collect(ds: Any, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Pull a (small: an evaluation split) features dataset to the driver, batch by batch."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k, v in b.items():
            if columns is None or k in columns:
                parts.setdefault(k, []).append(v)
    if not parts:
        return {}
    return {k: np.concatenate(v) for k, v in parts.items()}
