"""ONNX embedders: check a graph against its preprocess, run it with onnxruntime as a module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from pipeline.config import PreprocessConfig

# onnxruntime's input types that a float image batch can be cast to
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxError(ValueError):
    """An ONNX file is corrupt or unusable as an embedder; store.py names the model in it."""


@dataclass(frozen=True)
class OnnxGraph:
    """What the graph says: its one input, its first output, the embedding dim if static."""

    input_name: str
    input_type: str
    output_name: str
    embedding_dim: int | None


def looks_like_onnx(data: bytes) -> bool:
    """Whether the bytes parse as an ONNX ModelProto with a graph (no magic number exists)."""
    try:
        return bool(session(data).get_outputs())
    except OnnxError:
        return False


def session(data: bytes, threads: int = 1, use_gpu: bool = False) -> ort.InferenceSession:
    """An onnxruntime session over the model bytes; `threads` intra-op threads (one call
    runs on the CPUs the Ray task was given), CUDA first when asked for and installed."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # warnings about unused initializers are not the user's concern
    providers = ["CPUExecutionProvider"]
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise OnnxError(f"not a loadable ONNX model: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _dim(v: Any) -> int | None:
    """A static dimension, or None for a symbolic ('batch') or unknown one."""
    return v if isinstance(v, int) and v > 0 else None


def check_graph(sess: ort.InferenceSession, pre: PreprocessConfig) -> OnnxGraph:
    """Check the graph takes one (batch, channels, size, size) float input with a dynamic
    batch axis, as the preprocess makes it; OnnxError says what disagrees."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise OnnxError(f"the graph has {len(inputs)} inputs ({names}); an embedder takes one")
    if not outputs:
        raise OnnxError("the graph has no output")
    x = inputs[0]
    shape = list(x.shape)
    if x.type not in _DTYPES:
        raise OnnxError(f"input {x.name!r} is {x.type}; an image batch is float")
    want = [None, pre.channels, pre.input_size, pre.input_size]
    if len(shape) != 4 or any(
        _dim(g) not in (None, w) for g, w in zip(shape[1:], want[1:], strict=True)
    ):
        raise OnnxError(
            f"input {x.name!r} has shape {shape}, but the preprocess makes "
            f"(batch, {pre.channels}, {pre.input_size}, {pre.input_size}) "
            "(preprocess.channels, preprocess.input_size)"
        )
    if _dim(shape[0]) is not None:
        raise OnnxError(
            f"input {x.name!r} has a fixed batch size of {shape[0]} (shape {shape}); carryover "
            "embeds in batches of embed.batch_size: export with a dynamic batch axis, e.g. "
            f"torch.onnx.export(..., dynamic_axes={{{x.name!r}: {{0: 'batch'}}}})"
        )
    out = outputs[0]
    dim = _dim(out.shape[1]) if len(out.shape) == 2 else None
    return OnnxGraph(x.name, x.type, out.name, dim)


def run(sess: ort.InferenceSession, graph: OnnxGraph, x: np.ndarray) -> np.ndarray:
    """The graph's first output for a batch of preprocessed images."""
    feed = {graph.input_name: np.ascontiguousarray(x, dtype=_DTYPES[graph.input_type])}
    return sess.run([graph.output_name], feed)[0]


def probe_dim(sess: ort.InferenceSession, graph: OnnxGraph, pre: PreprocessConfig) -> int:
    """The embedding dim from one run on a zero batch, for a graph whose output is dynamic."""
    x = np.zeros((2, pre.channels, pre.input_size, pre.input_size), np.float32)
    try:
        out = run(sess, graph, x)
    except Exception as e:  # onnxruntime's own error types
        raise OnnxError(f"failed on a zero batch of shape {x.shape}: {_first_line(e)}") from None
    if out.ndim != 2 or out.shape[0] != 2:
        raise OnnxError(
            f"output {graph.output_name!r} is {out.shape} for a batch of 2; an embedder "
            "returns (batch, embedding_dim)"
        )
    return int(out.shape[1])


class OnnxEmbedder(nn.Module):
    """An ONNX graph behind nn.Module's call: forward(x) -> embeddings, as a torch embedder.

    The session is built on the first call, in the process that runs it (a Ray worker), with
    as many intra-op threads as torch was given there; it is never pickled.
    """

    def __init__(self, data: bytes, graph: OnnxGraph, where: str, use_gpu: bool = False):
        super().__init__()
        self.data, self.graph, self.where, self.use_gpu = data, graph, where, use_gpu
        self._session: ort.InferenceSession | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            self._session = session(self.data, torch.get_num_threads(), self.use_gpu)
        try:
            out = run(self._session, self.graph, x.detach().cpu().numpy())
        except Exception as e:  # onnxruntime's own error types
            raise OnnxError(
                f"{self.where}: ONNX run failed on input {tuple(x.shape)}: {_first_line(e)}"
            ) from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
