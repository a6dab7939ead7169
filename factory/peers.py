"""Peer runtimes timed next to the artifacts: PyTorch eager and ONNX Runtime, both fp32."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.deploy import Embedder


def torch_eager_call(model: nn.Module, example: np.ndarray, threads: int) -> Callable[[], object]:
    """A zero-argument call running the eager model once at `threads` intra-op threads."""
    tensor = torch.from_numpy(np.ascontiguousarray(example))

    def run() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return model(tensor)
        finally:
            torch.set_num_threads(previous)

    return run


def onnx_runtime_call(model: Embedder, example: np.ndarray, threads: int, workdir: Path) -> Callable[[], object]:
    """Export the deployed graph to ONNX (torch.onnx, dynamo exporter) and return a timed call."""
    import onnxruntime as ort

    path = workdir / "peer_fp32.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=True,
                              input_names=["image"], output_names=["embedding"], verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example}
    return lambda: session.run(None, feed)


def onnx_workdir() -> tempfile.TemporaryDirectory:
    """A scratch folder for the peer ONNX export (it is not a shipped artifact)."""
    return tempfile.TemporaryDirectory(prefix="factory-onnx-")
