"""Each Ray Train task's step, run in-process on tiny batches: it builds, its loss falls."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ArchitectureConfig, ModelConfig, PreprocessConfig, load_config
from pipeline.train import embedder, side_info, transformation

PRE = PreprocessConfig(input_size=8)


def _images(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    # each class is a bright square in its own corner: learnable in a few steps
    x = torch.full((n, 1, 8, 8), -1.0) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(labels.tolist()):
        r, k = divmod(c, 2)
        x[i, 0, r * 4 : r * 4 + 4, k * 4 : k * 4 + 4] = 1.0
    return {"pixels": x.view(n, -1), "label": labels}


def _losses(task, batch: dict[str, torch.Tensor], steps: int = 25, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam(task.train.parameters(), lr=lr)
    out = []
    for _ in range(steps):
        loss, n, _ = task.step(task.train, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
        assert n == len(batch["label"])
    return out


def test_bct_task_trains_through_the_frozen_old_classifier() -> None:
    arch = ArchitectureConfig(widths=[4, 8], embedding_dim=6, num_classes=4)
    cfg = ModelConfig(name="n", architecture=arch, preprocess=PRE)
    cfg.train.loss = "bct"
    w_old = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    bct = {"weight": w_old.tolist(), "bias": [0.0] * 4, "from_model": "o"}
    torch.manual_seed(0)  # the network's initial weights: independent of earlier tests
    task = embedder.build_task({"model": cfg.model_dump(mode="json"), "bct": bct})
    batch = _images()
    losses = _losses(task, batch)
    assert losses[-1] < 0.6 * losses[0]
    # the influence term is real: the frozen old classifier now reads the new embeddings
    with torch.no_grad():
        emb = task.save.eval()(batch["pixels"].view(-1, 1, 8, 8))
    acc = float(((emb @ w_old.T).argmax(1) == batch["label"]).float().mean())
    assert acc >= 0.75
    assert all(not p.requires_grad or p.grad is not None for p in task.save.parameters())


def test_side_info_task_lowers_the_contrastive_loss() -> None:
    cfg = load_config(None, ["side_info.architecture.widths=[4,8]", "side_info.proj_dim=8"])
    sc = cfg.side_info_model.model_copy(update={"preprocess": PRE})
    torch.manual_seed(0)
    task = side_info.build_task({"model": sc.model_dump(mode="json")})
    losses = _losses(task, _images(), steps=20)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert task.save.embedding_dim == sc.architecture.embedding_dim


def _features(n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    old, side = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
    mix = torch.randn(7, 5, generator=g)
    new = torch.tanh(torch.cat([old, side], 1) @ mix)  # a function of (old, side)
    return {"old": old, "side": side, "new": new, "label": torch.arange(n) % 5}


def _transformation_task(loss: str, side: bool):
    torch.manual_seed(0)
    return transformation.build_task(_transformation_config(loss, side))


def _transformation_config(loss: str, side: bool) -> dict:
    cfg = load_config(None, [f"transformation.loss={loss}"])
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    config = {
        "transformation": cfg.transformation.model_dump(mode="json"),
        "arch": {
            "old_dim": 4,
            "new_dim": 5,
            "side_dim": 3 if side else 0,
            "inner_dim": 32,
            "uncertainty": loss == "fastfill",
        },
        "new_classifier": {"weight": w.tolist(), "bias": [0.0] * 5},
        "columns": {"old": "old", "side": "side" if side else None, "new": "new"},
    }
    return config


def test_fastfill_task_without_a_classifier_still_learns_an_uncertainty() -> None:
    # A TorchScript/ONNX new model on an unlabelled gallery: no head, labels -1.
    config = _transformation_config("fastfill", True)
    config["new_classifier"] = None
    torch.manual_seed(0)
    task = transformation.build_task(config)
    feats = {**_features(), "label": torch.full((64,), -1)}
    losses = _losses(task, feats, steps=60)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        _, log_var = task.save.eval()(feats["old"], feats["side"])
    assert float(log_var.std()) > 0


def test_fct_task_regresses_new_from_old_and_side() -> None:
    feats = _features()
    with_side = _losses(_transformation_task("fct", True), feats, steps=60)
    without = _losses(_transformation_task("fct", False), feats, steps=60)
    assert with_side[-1] < 0.3 * with_side[0]
    # new depends on side-info too: the model that sees it fits better
    assert with_side[-1] < without[-1]


def test_fastfill_task_learns_a_per_row_uncertainty() -> None:
    task = _transformation_task("fastfill", True)
    feats = _features()
    losses = _losses(task, feats, steps=60)
    assert losses[-1] < losses[0]
    model = task.save.eval()
    with torch.no_grad():
        pred, log_var = model(feats["old"], feats["side"])
    assert pred.shape == (64, 5) and log_var.shape == (64,)
    assert float(log_var.std()) > 0  # not a constant: rows differ in how sure h is
