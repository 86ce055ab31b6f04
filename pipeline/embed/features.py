"""Paired features: several models' embeddings of the same images, for compat training and eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch

from pipeline.compat.augment import simclr_augment
from pipeline.config import EmbedConfig, StorageConfig
from pipeline.data.decode import decode_batch
from pipeline.data.sources import ImageLayout
from pipeline.io import uri as uri_io
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
    layout: ImageLayout | None = None,
) -> Any:
    """A Ray Dataset of key, label, view and one (n, d) column per model, for one split."""
    ds = image_dataset(images_uri, storage, ["key", "image", "label", "split"], layout)
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


PAIRS_DONE = "_COMPLETE"  # written last: the files above it are whole


@dataclass(frozen=True)
class StoredPairs:
    """Paired features written once to Parquet, streamed back from there on every pass."""

    dataset: Any  # a Ray Dataset reading the files (lazily, block by block)
    uri: str
    rows: int
    row_bytes: int  # float32 bytes of one row's embedding columns

    @property
    def size_bytes(self) -> int:
        return self.rows * self.row_bytes


def store_pairs(
    feats: Any, uri: str, dims: dict[str, int], storage: StorageConfig | None = None
) -> StoredPairs:
    """Write `feats` under `uri` unless a complete copy is there already, and stream it back.

    Ray Data writes block by block, so embedding a million 1,280-d training pairs (~10 GB)
    holds a few blocks at a time, never the set; the training epochs then read the files
    rather than an object store that would have to hold (or spill) all of it. `uri` is on
    storage every node reaches (beside Ray Train's checkpoints), and names what the pairs
    came from, so a rerun reuses them."""
    done, loc = uri_io.join(uri, PAIRS_DONE), uri_io.resolve(uri, storage)
    if not uri_io.exists(done, storage):
        uri_io.delete(uri, storage)  # a write cut short leaves files without the marker
        feats.write_parquet(loc.path, filesystem=loc.fs)
        uri_io.write_bytes(done, b"", storage)
    files = uri_io.parquet_files(uri, storage)
    rows = sum(uri_io.parquet_num_rows(f, storage) for f in files)
    paths = [uri_io.resolve(f, storage).path for f in files]
    ds = ray.data.read_parquet(paths, filesystem=loc.fs)
    return StoredPairs(ds, uri, rows, 4 * sum(dims.values()))
