"""ONNX embedders: outputs as the torch model's, dim from the graph, each refusal one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import ArchitectureConfig, ModelConfig, PreprocessConfig
from pipeline.embed.stages import EmbedStage
from pipeline.models.store import ModelLoadError, build_model, model_output, resolve_blob

PRE = PreprocessConfig(input_size=8)
DIM = 6


class _TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b).flatten(1)


def _net(channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, DIM),
    ).eval()


def export(path: Path, net: nn.Module | None = None, batch: bool = True, **kw) -> Path:
    """`net` (default: a tiny conv embedder of 8x8 grey images) as ONNX, with a dynamic
    batch axis unless `batch` is False."""
    net = net if net is not None else _net()
    args = kw.pop("args", (torch.zeros(2, 1, 8, 8),))
    names = kw.pop("input_names", ["x"])
    torch.onnx.export(
        net,
        args,
        str(path),
        input_names=names,
        output_names=["e"],
        dynamic_axes={**{n: {0: "n"} for n in names}, "e": {0: "n"}} if batch else None,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("onnx") / "m.onnx")


def _cfg(uri: Path | str, pre: PreprocessConfig = PRE, **kw) -> ModelConfig:
    return ModelConfig(name="m", uri=str(uri), preprocess=pre, **kw)


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_onnx_outputs_equal_the_torch_model(onnx_file: Path) -> None:
    blob = resolve_blob(_cfg(onnx_file))
    assert (blob.kind, blob.embedding_dim, blob.meta["graph"].embedding_dim) == ("onnx", DIM, DIM)
    with torch.inference_mode():
        want = _net()(_x()).numpy()
        got = model_output(build_model(blob)(_x()), 5, blob)
    assert got.shape == (5, DIM) and float(np.abs(got - want).max()) < 1e-5
    # through the embed stage, as a Ray actor runs it; batch sizes vary (a short last batch)
    stage = EmbedStage(blob, threads=1)
    for n in (1, 3):
        pixels = _x(n).numpy().reshape(n, -1)
        batch = {"key": np.arange(n), "pixels": pixels, "error": np.full(n, ""), "shard": [0] * n}
        out = stage(batch)["embedding"]
        assert float(np.abs(out - _net()(_x(n)).detach().numpy()).max()) < 1e-5


def test_session_is_built_in_the_worker_and_never_pickled(onnx_file: Path) -> None:
    blob = resolve_blob(_cfg(onnx_file))
    model = build_model(blob)
    assert model._session is None  # built on the first call, in the process that runs it
    first = model(_x())
    assert model._session is not None
    copy = pickle.loads(pickle.dumps(model))  # what Ray does with a blob or a module
    assert copy._session is None
    torch.testing.assert_close(copy(_x()), first)
    again = pickle.loads(pickle.dumps(blob))
    assert again.digest == blob.digest and again.kind == "onnx"


def test_digest_covers_the_onnx_bytes(onnx_file: Path, tmp_path: Path) -> None:
    a = resolve_blob(_cfg(onnx_file))
    same = tmp_path / "same.onnx"
    same.write_bytes(onnx_file.read_bytes())
    assert resolve_blob(_cfg(same)).digest == a.digest
    net = _net()
    with torch.no_grad():
        net[-1].bias += 1.0  # other weights, same graph
    other = resolve_blob(_cfg(export(tmp_path / "other.onnx", net)))
    assert other.digest != a.digest and other.digest.startswith("sha256:")


def test_detected_by_content_not_by_suffix(onnx_file: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(onnx_file.read_bytes())
    assert resolve_blob(_cfg(renamed)).kind == "onnx"
    ts = tmp_path / "really-torchscript.onnx"
    torch.jit.save(torch.jit.trace(_net(), _x()), str(ts))
    blob = resolve_blob(_cfg(ts, architecture=ArchitectureConfig(embedding_dim=DIM)))
    assert blob.kind == "torchscript"


def test_dynamic_output_dim_comes_from_a_probe_run(tmp_path: Path) -> None:
    # height and width dynamic: the flattened output's width is known only from a run
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()).eval()
    path = tmp_path / "d.onnx"
    axes = {"x": {0: "n", 2: "h", 3: "w"}, "e": {0: "n", 1: "d"}}
    torch.onnx.export(
        net,
        (torch.zeros(2, 1, 8, 8),),
        str(path),
        input_names=["x"],
        output_names=["e"],
        dynamic_axes=axes,
        dynamo=False,
    )
    blob = resolve_blob(_cfg(path))
    assert blob.meta["graph"].embedding_dim is None and blob.embedding_dim == 2 * 8 * 8


def test_config_embedding_dim_must_agree(onnx_file: Path) -> None:
    ok = resolve_blob(_cfg(onnx_file, architecture=ArchitectureConfig(embedding_dim=DIM)))
    assert ok.embedding_dim == DIM
    with pytest.raises(ModelLoadError) as e:
        resolve_blob(_cfg(onnx_file, architecture=ArchitectureConfig(embedding_dim=7)))
    assert str(e.value) == (
        f"{onnx_file}: ONNX model 'm' outputs 6-d embeddings, but the config sets "
        "architecture.embedding_dim=7: fix or remove the key"
    )


def test_default_embedding_dim_does_not_count_as_set(onnx_file: Path) -> None:
    from pipeline.config import load_config

    cfg = load_config(None, [f"old_model.uri={onnx_file}", "old_model.preprocess.input_size=8"])
    assert cfg.old_model.architecture.embedding_dim == 32  # the default, not given
    assert resolve_blob(cfg.old_model).embedding_dim == DIM


def _refusal(cfg: ModelConfig) -> str:
    with pytest.raises(ModelLoadError) as e:
        resolve_blob(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{cfg.uri}: ONNX model 'm': ")
    return msg.removeprefix(f"{cfg.uri}: ONNX model 'm': ")


def test_corrupt_onnx_is_refused_naming_the_uri(onnx_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(onnx_file.read_bytes()[: len(onnx_file.read_bytes()) // 2])
    assert _refusal(_cfg(bad)).startswith("not a loadable ONNX model: ")


def test_graph_with_two_inputs_is_refused(tmp_path: Path) -> None:
    two = torch.zeros(2, 1, 8, 8)
    path = export(tmp_path / "two.onnx", _TwoInputs(), args=(two, two), input_names=["a", "b"])
    assert _refusal(_cfg(path)) == "the graph has 2 inputs (a, b); an embedder takes one"


@pytest.mark.parametrize(
    ("pre", "what"),
    [
        (PreprocessConfig(input_size=8, channels=3, mean=[0.5] * 3, std=[0.5] * 3), "3, 8, 8"),
        (PreprocessConfig(input_size=16), "1, 16, 16"),
    ],
)
def test_input_that_disagrees_with_the_preprocess_is_refused(
    onnx_file: Path, pre: PreprocessConfig, what: str
) -> None:
    assert _refusal(_cfg(onnx_file, pre)) == (
        f"input 'x' has shape ['n', 1, 8, 8], but the preprocess makes (batch, {what}) "
        "(preprocess.channels, preprocess.input_size)"
    )


def test_fixed_batch_is_refused(tmp_path: Path) -> None:
    path = export(tmp_path / "fixed.onnx", batch=False, args=(torch.zeros(1, 1, 8, 8),))
    assert _refusal(_cfg(path)) == (
        "input 'x' has a fixed batch size of 1 (shape [1, 1, 8, 8]); carryover embeds in "
        "batches of embed.batch_size: export with a dynamic batch axis, e.g. "
        "torch.onnx.export(..., dynamic_axes={'x': {0: 'batch'}})"
    )


def test_registered_onnx_model_resolves(onnx_file: Path, tmp_path: Path) -> None:
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t", str(tmp_path / "art"))
    d = tmp_path / "reg"
    d.mkdir()
    (d / "model.onnx").write_bytes(onnx_file.read_bytes())
    (d / "model.json").write_text("{}")  # not carryover's format: found by its .onnx file
    with tracker.run("ext") as run:
        tracker.register_model("onnx-embedder", d, run.run_id, aliases=["serving"])
    blob = resolve_blob(_cfg("models:/onnx-embedder@serving"), tracking_uri=uri)
    assert (blob.kind, blob.embedding_dim, blob.meta["uri"]) == (
        "onnx",
        DIM,
        "models:/onnx-embedder@serving",
    )
    assert blob.digest == resolve_blob(_cfg(onnx_file)).digest


def test_session_threads_follow_the_embed_stage(onnx_file: Path) -> None:
    """embed.torch_threads sizes onnxruntime's intra-op pool as it sizes torch's."""
    before = torch.get_num_threads()
    try:
        stage = EmbedStage(resolve_blob(_cfg(onnx_file)), threads=2)
        opts = stage.model._session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
        assert stage.model._session.get_providers() == ["CPUExecutionProvider"]
        # use_gpu asks for CUDA; this onnxruntime has no CUDAExecutionProvider: the CPU runs it
        gpu = EmbedStage(resolve_blob(_cfg(onnx_file, use_gpu=True)), threads=1)
        assert gpu.model._session.get_providers() == ["CPUExecutionProvider"]
    finally:
        torch.set_num_threads(before)
