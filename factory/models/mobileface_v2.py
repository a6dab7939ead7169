"""MobileFace Identification V2, imported with its pretrained weights.

Source: the public repository becauseofAI/MobileFace (MIT licence), folder `MobileFace_Identification/`, at
commit 128cea33b928dc9bb6d1963202b57a97f5661ccf (pinned with the files' sha256 in `factory.teachers.mobileface`).
No paper: the repository publishes the two MXNet files (symbol JSON and `.params`), an LFW accuracy of 99.653%
and no parameter or multiply-add figures. Computed here at 112x112: 0.882 M parameters, 40.7 M multiply-adds.

A MobileNetV2-style network with ReLU6, a flattened 7x7 feature map into a 256-D fully-connected layer and a
batch norm. The graph is rebuilt in PyTorch from the symbol file, op by op (`factory.teachers.mxnet.SymbolGraph`),
with the weights read from the `.params` file at build time; neither file nor the converted weights are stored
in this repository. The graph scales its input itself, (pixel - 127.5) / 128 on 0-255 RGB NCHW, so recipes give
it mean 0 and std 1. Its training data is not documented (likely an MS-Celeb-1M derivative, which shares
celebrities with LFW), so its LFW score may be flattered by identities it saw in training.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from factory.errors import FactoryError
from factory.models.registry import ImportedWeights, register_model
from factory.teachers import mobileface
from factory.teachers.registry import teacher_entry

EMBEDDING_SIZE = 256
INPUT_SIZE = 112


def source_files() -> list[Path]:
    """The verified symbol and params files (see `factory.teachers.mobileface.find_files` for where)."""
    return list(mobileface.find_files())


_TEACHER = teacher_entry(mobileface.NAME)


@register_model(
    "mobileface_v2",
    paper="github.com/becauseofAI/MobileFace (no paper)",
    paper_numbers={"lfw_accuracy": _TEACHER.published_lfw},
    imported=ImportedWeights(
        source=_TEACHER.source,
        licence=_TEACHER.licence,
        training_data="not documented; may share identities with LFW (likely an MS-Celeb-1M derivative)",
        files=source_files,
        input_normalisation="(pixel - 127.5) / 128",
    ),
)
def mobileface_v2(embedding_size: int = EMBEDDING_SIZE, input_size: int = INPUT_SIZE) -> nn.Module:
    """The MobileFace V2 graph with its pretrained weights (input 0-255 RGB NCHW, output the raw 256-D embedding).

    Raises:
        FactoryError: another embedding or input size is asked for (the weights fix both), or the source files
            are missing or not the pinned ones.
    """
    if (embedding_size, input_size) != (EMBEDDING_SIZE, INPUT_SIZE):
        raise FactoryError(f"mobileface_v2 is imported with its weights, which fix embedding_size {EMBEDDING_SIZE} "
                           f"and input size {INPUT_SIZE}; got embedding_size {embedding_size}, input size "
                           f"{input_size}: set model.embedding_size: {EMBEDDING_SIZE} and model.input.size: "
                           f"{INPUT_SIZE} in the recipe")
    return mobileface.build_network()
