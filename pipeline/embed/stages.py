"""Plain callables over batches: decode with shard ids, embed with a torch model."""

from __future__ import annotations

import os

import numpy as np
import ray
import torch

from pipeline.config import PreprocessConfig
from pipeline.data.decode import decode_batch
from pipeline.embed.quality import NON_FINITE, row_problems
from pipeline.models.store import ModelBlob, build_model, check_output_dim, model_output


def decode_with_side(
    batch: dict[str, np.ndarray],
    pre: PreprocessConfig,
    max_pixels: int,
    side_pre: PreprocessConfig | None = None,
) -> dict[str, np.ndarray]:
    """decode_batch for the model; where side-info has a preprocess of its own (a lower
    resolution), the same bytes decoded for it too, as `side_pixels` (a row is ok only when
    both decodes are)."""
    images = {"key": batch["key"], "image": batch["image"]}
    out = decode_batch(images, pre, max_pixels)
    if side_pre is None or side_pre == pre:
        return out
    side = decode_batch(images, side_pre, max_pixels)
    out["error"] = np.where(out["error"] == "", side["error"], out["error"])
    return {**out, "side_pixels": side["pixels"]}


def decode_stage(
    batch: dict[str, np.ndarray],
    pre: PreprocessConfig,
    max_pixels: int,
    shard_of_path: dict[str, int],
    side_pre: PreprocessConfig | None = None,
) -> dict[str, np.ndarray]:
    """Decode images; tag each row with its gallery shard id (from the file it came from)."""
    out = decode_with_side(batch, pre, max_pixels, side_pre)
    if "reject" in batch:  # refused by the source (img2dataset's status): its reason stands
        out["error"] = np.where(batch["reject"] != "", batch["reject"], out["error"])
    paths = batch["path"]
    # Blocks come from one file each, so the lookup is usually a single dict hit.
    uniq, inv = np.unique(paths, return_inverse=True)
    ids = np.array([shard_of_path[p] for p in uniq], dtype=np.int64)[inv]
    keep = ("key", "pixels", "error", "side_pixels")
    return {**{k: out[k] for k in keep if k in out}, "shard": ids}


def worker_id() -> str:
    """`<ray node id prefix>:<pid>` of this process (`local:<pid>` outside Ray): which node
    and actor embedded a row, so a run shows its work spread over actors and nodes."""
    node = "local"
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()[:12]
    return f"{node}:{os.getpid()}"


class EmbedStage:
    """Ray Data actor: builds the model once, then maps decoded pixels to embeddings.

    With a side-info blob it also emits FCT's `side_info` for each row, from the batch's
    `side_pixels` where side-info has its own preprocess, else from the model's pixels.
    """

    def __init__(self, blob: ModelBlob, threads: int = 1, side_blob: ModelBlob | None = None):
        torch.set_num_threads(threads)
        self.model, self.blob = build_model(blob), blob
        check_output_dim(self.model, blob)
        self.worker = worker_id()
        p = blob.preprocess
        self.shape = (-1, p.channels, p.input_size, p.input_size)
        self.dim = blob.embedding_dim
        self.side = None
        if side_blob is not None:
            self.side, self.side_blob = build_model(side_blob), side_blob
            check_output_dim(self.side, side_blob)
            self.side_dim = side_blob.embedding_dim
            q = side_blob.preprocess
            self.side_shape = (-1, q.channels, q.input_size, q.input_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        emb = np.zeros((len(ok), self.dim), dtype=np.float32)
        side = None if self.side is None else np.zeros((len(ok), self.side_dim), np.float32)
        err = batch["error"]
        if ok.any():
            pixels = batch["pixels"] if ok.all() else batch["pixels"][ok]  # no copy when all ok
            x = torch.from_numpy(np.ascontiguousarray(pixels)).view(self.shape)
            with torch.inference_mode():
                out = model_output(self.model(x), len(x), self.blob)
                why = row_problems(out)
                if side is not None:
                    side[ok] = model_output(
                        self.side(self._side_input(batch, ok, x)), len(x), self.side_blob
                    )
                    # side-info only feeds h: a non-finite one is fatal, a small norm is not
                    side_ok = np.isfinite(side[ok]).all(axis=1)
                    why = np.where((why == "") & ~side_ok, NON_FINITE, why)
            bad = why != ""
            emb[ok] = np.where(bad[:, None], 0.0, out)
            if bad.any():  # a degenerate embedding is a rejected row, not a stored one
                err = err.astype(object).copy()
                err[np.flatnonzero(ok)[bad]] = why[bad]
        res = {"key": batch["key"], "embedding": emb, "error": err, "shard": batch["shard"]}
        res["worker"] = np.full(len(ok), self.worker, dtype=object)
        if side is not None:
            res["side_info"] = side
        return res

    def _side_input(self, batch: dict[str, np.ndarray], ok: np.ndarray, x: torch.Tensor):
        if "side_pixels" not in batch:
            return x  # side-info shares the model's preprocess
        pixels = batch["side_pixels"] if ok.all() else batch["side_pixels"][ok]
        return torch.from_numpy(np.ascontiguousarray(pixels)).view(self.side_shape)


class DecodeEmbedStage(EmbedStage):
    """Decode and embed in one actor call: decoded pixels never cross the object store, and
    each actor keeps one core busy end to end (Ray Data's fastest layout on few cores)."""

    def __init__(
        self,
        blob: ModelBlob,
        threads: int,
        side_blob: ModelBlob | None,
        max_pixels: int,
        shard_of_path: dict[str, int],
    ):
        super().__init__(blob, threads, side_blob)
        self.pre, self.max_pixels, self.shard_of_path = blob.preprocess, max_pixels, shard_of_path
        self.side_pre = side_blob.preprocess if side_blob is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = decode_stage(batch, self.pre, self.max_pixels, self.shard_of_path, self.side_pre)
        return super().__call__(decoded)
