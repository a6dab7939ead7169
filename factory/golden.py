"""Golden faces for on-device parity: real aligned faces, preprocessed, with their reference embeddings.

The device lab (`mobile_harness`) runs these exact input tensors on phones and compares the outputs
with the reference, so phones are held to the same gates as the host. The faces are evaluation
(LFW) images, which a build already keeps disjoint from the calibration faces. Whole pairs are
taken, alternating same and different identity, so decision flips can be counted on the phone.

Files (raw little-endian float32, no header, so a C++ runner reads them with one fread):
`golden/inputs_nchw.bin` (N, 3, H, W), `golden/inputs_nhwc.bin` (N, H, W, 3) and
`golden/reference.bin` (N, embedding size); the manifest lists them with shapes and sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from factory.evaluation import EvaluationSet
from factory.io import atomic_path
from factory.weights import sha256_of

GOLDEN_FACES = 256


def select_golden(evaluation: EvaluationSet, count: int) -> tuple[list[int], list[list[int]]]:
    """Indices of up to `count` evaluation images taken pair by pair, and the pairs among them.

    Pairs are visited alternating same / different identity so both kinds are present.
    """
    same = [i for i in range(len(evaluation.same)) if evaluation.same[i]]
    different = [i for i in range(len(evaluation.same)) if not evaluation.same[i]]
    order = [i for couple in zip(same, different, strict=False) for i in couple]
    order += same[len(different):] + different[len(same):]
    chosen: dict[int, int] = {}
    pairs = []
    for pair in order:
        a, b = int(evaluation.index_a[pair]), int(evaluation.index_b[pair])
        new = [i for i in dict.fromkeys((a, b)) if i not in chosen]
        if len(chosen) + len(new) > count:
            break
        for image in new:
            chosen[image] = len(chosen)
        pairs.append([chosen[a], chosen[b], int(bool(evaluation.same[pair]))])
    return list(chosen), pairs


def write_golden(out: Path, evaluation: EvaluationSet, reference: np.ndarray, threshold: float,
                 count: int = GOLDEN_FACES) -> dict[str, Any]:
    """Write the golden files under `out/golden/` and return their manifest entry."""
    images, pairs = select_golden(evaluation, count)
    nhwc = np.ascontiguousarray(evaluation.pixels("NHWC")[images], dtype=np.float32)
    arrays = {
        "NCHW": np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)),
        "NHWC": nhwc,
        "reference": np.ascontiguousarray(reference[images], dtype=np.float32),
    }
    entries = {}
    for key, array in arrays.items():
        relative = f"golden/{'reference' if key == 'reference' else 'inputs_' + key.lower()}.bin"
        with atomic_path(out / relative) as tmp:
            array.astype("<f4").tofile(tmp)
        entries[key] = {"file": relative, "shape": list(array.shape), "dtype": "float32",
                        "bytes": int(array.nbytes), "sha256": sha256_of(out / relative)}
    return {
        "faces": len(images),
        "source": "evaluation (LFW) images, disjoint from the calibration faces; pixels in [0, 255], "
                  "preprocessed as every artifact expects",
        "images": [f"{Path(evaluation.paths[i]).parent.name}/{Path(evaluation.paths[i]).name}" for i in images],
        "inputs": {"NCHW": entries["NCHW"], "NHWC": entries["NHWC"]},
        "reference": {**entries["reference"], "computed_by": "PyTorch fp32 reference (the build's Embedder)"},
        "pairs": pairs,
        "threshold": threshold,
    }
