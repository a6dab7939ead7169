"""The same artifact on this computer's CPU: the golden faces through the host's runtimes (ai-edge-litert with
XNNPACK, ExecuTorch's runtime), so that a phone's embeddings can be set against the host's: same artifact, same
faces, the phone's kernels (ARM) against the host's (x86 here). The reference embeddings say how far an artifact
is from PyTorch; this says how far the phone's kernels are from the host's, where the build verified it.
"""

from __future__ import annotations

import platform
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mobile_harness.manifest import Golden
from mobile_harness.parity import parity

# Embeddings per (artifact path, sha256, inputs, threads): every phone of a run compares with the same ones.
_computed: dict[tuple[str, str, str, int], np.ndarray] = {}
_lock = threading.Lock()


def _embed(path: Path, fmt: str, faces: np.ndarray, threads: int) -> np.ndarray:
    rows = []
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        tensor_in, tensor_out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        for face in faces:
            interpreter.set_tensor(tensor_in["index"], face.reshape(tensor_in["shape"]))
            interpreter.invoke()
            rows.append(interpreter.get_tensor(tensor_out["index"]).reshape(-1).copy())
    elif fmt == "executorch":
        import torch
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(path).load_method("forward")
        for face in faces:
            rows.append(method.execute([torch.from_numpy(np.ascontiguousarray(face[None]))])[0].numpy().reshape(-1))
    else:
        raise ValueError(f"no host runtime for format {fmt!r}")
    return np.stack(rows).astype(np.float32)


def host_embeddings(build_dir: Path, artifact: dict[str, Any], golden: Golden, threads: int) -> np.ndarray:
    """The golden faces' embeddings from `artifact` run on this computer with `threads` threads (computed once)."""
    inputs = golden.inputs[artifact["io"]["input"]["layout"]]
    key = (str(build_dir / artifact["file"]), artifact["sha256"], str(inputs), threads)
    with _lock:
        if key not in _computed:
            shape = [golden.faces, *artifact["io"]["input"]["shape"][1:]]
            faces = np.fromfile(inputs, dtype=np.float32).reshape(shape)
            _computed[key] = _embed(build_dir / artifact["file"], artifact["format"], faces, threads)
        return _computed[key]


def compare_with_host(build_dir: Path, artifact: dict[str, Any], golden: Golden, embeddings: np.ndarray,
                      threads: int) -> dict[str, Any]:
    """Cosine per face and decision flips between the phone's embeddings and this computer's, same artifact and
    faces (`parity` with the host as the reference); `status: not measured` with why when the host cannot run it."""
    try:
        host = host_embeddings(build_dir, artifact, golden, threads)
    except (ImportError, RuntimeError, ValueError) as error:
        return {"status": "not measured", "reason": f"{artifact['file']} does not run on this computer: {error}"}
    return {"status": "ok", "host": platform.machine(), "threads": threads,
            **parity(embeddings, host, golden.pairs, golden.threshold)}
