"""BT², d-Simplex and OCA training heads: what trains, what stays frozen, what is saved."""

import pytest
import torch

from pipeline.compat.losses import dsimplex_vertices
from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models.backbone import EmbeddingNet
from pipeline.train.compat_heads import dsimplex_task, rotated_task
from pipeline.train.embedder import compat_meta


def _cfg(loss: str, dim: int = 3) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "m",
            "architecture": {"widths": [4], "embedding_dim": dim, "num_classes": 4},
            "preprocess": {"input_size": 8},
            "train": {"loss": loss, "label_smoothing": 0.0},
        }
    )


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.randn(n, 64, generator=g), "label": torch.arange(n) % 4}


def _train(task, steps: int = 3) -> None:
    params = [p for p in task.train.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        loss, _, _ = task.step(task.train, _batch())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_dsimplex_classifier_is_the_simplex_and_never_trains() -> None:
    cfg = _cfg("dsimplex")
    net = EmbeddingNet(cfg.architecture, 1)
    task = dsimplex_task(cfg, net)
    embed_before = net.embed.weight.detach().clone()
    _train(task)
    assert torch.equal(net.classifier.weight, dsimplex_vertices(4, 3))
    assert net.classifier.bias.abs().max().item() == 0.0
    assert not torch.equal(net.embed.weight, embed_before)  # the rest does train


def test_dsimplex_needs_k_minus_1_dims() -> None:
    with pytest.raises(ValueError, match="embedding_dim >= num_classes - 1"):
        _cfg("dsimplex", dim=2)


@pytest.mark.parametrize("loss", ["bt2", "oca"])
def test_rotated_head_saves_psi_with_the_rotation_folded_in(loss: str) -> None:
    cfg = _cfg(loss)
    net = EmbeddingNet(cfg.architecture, 1)
    old = {"weight": [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], "bias": [0.0, 0.0, 0.1]}
    task = rotated_task(cfg, net, old)
    n_params = sum(p.numel() for p in task.train.parameters())
    assert n_params == sum(p.numel() for p in net.parameters()) + 3 * 3  # + Q; old is frozen
    _train(task)
    q = task.train.rotation.weight.detach()
    assert not torch.allclose(q, torch.eye(3), atol=1e-4)  # Q learned ...
    assert torch.allclose(q @ q.T, torch.eye(3), atol=1e-5)  # ... and stays orthogonal
    saved = EmbeddingNet(cfg.architecture, 1)
    saved.load_state_dict(task.save.state_dict())
    saved.eval(), task.train.eval()
    x = _batch()["pixels"].view(-1, 1, 8, 8)
    with torch.no_grad():
        phi, psi, logits = task.train(x)
        emb, saved_logits = saved.logits(x)
    assert torch.allclose(emb, psi, atol=1e-5)  # the stored vector is psi = Q phi
    assert torch.allclose(saved_logits, logits, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(emb[:1], emb), cos(phi[:1], phi), atol=1e-5)  # new/new as phi
    assert compat_meta(loss, {**old, "from_model": "v1"})["compat_dims"] == 2


def test_rotated_head_refuses_a_smaller_new_space() -> None:
    cfg = _cfg("bt2", dim=3)
    old = {"weight": [[1.0] * 4], "bias": [0.0]}
    with pytest.raises(ValueError, match="smaller than the old one"):
        rotated_task(cfg, EmbeddingNet(cfg.architecture, 1), old)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["new_model.train.loss=dsimplex"], "needs old_model.train.loss=dsimplex"),
        (
            [
                "new_model.train.loss=dsimplex",
                "old_model.train.loss=dsimplex",
                "old_model.architecture.embedding_dim=9",
            ],
            "same architecture.num_classes and embedding_dim",
        ),
        (["old_model.train.loss=bt2"], "needs an older model"),
    ],
)
def test_config_refuses_losses_that_cannot_be_compatible(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_a_dsimplex_pair_and_the_compat_keys() -> None:
    cfg = load_config(
        None,
        [
            "new_model.train.loss=dsimplex",
            "old_model.train.loss=dsimplex",
            "old_model.architecture.embedding_dim=64",
            "new_model.train.compat.oca_lambda=0.5",
        ],
    )
    assert cfg.new_model.train.compat.oca_lambda == 0.5
    assert cfg.new_model.train.compat.bt2_lambda == 1.0
