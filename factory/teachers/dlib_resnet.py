"""dlib's ResNet face-recognition network v1 as a teacher.

D. E. King, "High Quality Face Recognition with Deep Metric Learning", dlib blog, 2017-02-12
(http://blog.dlib.net/2017/02/high-quality-face-recognition-with-deep.html); network as in dlib's
`examples/dnn_face_recognition_ex.cpp`: a 29-layer ResNet (ResNet-34 with a few layers removed and
half the filters) ending in a 128-D metric embedding, trained on about 3 M faces of 7,485 identities
chosen to exclude LFW identities; the author reports LFW 99.38% ± 0.27.

The weights (CC0) come from the `face_recognition_models==0.3.0` sdist (`factory.teachers.dlib_files`)
and run in dlib itself (`dlib-bin` wheel; CPU). Our 112x112 crops are warped to dlib's 150x150 chips
by the fitted affine of `factory.teachers.dlib_chip`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from factory.data import load_images
from factory.metrics import l2_normalise
from factory.teachers.dlib_chip import CHIP_SIZE, CROP_SIZE, CROP_TO_CHIP, PhotoAlignment
from factory.teachers.dlib_files import MODEL_FOLDER, RESNET_V1, model_file
from factory.teachers.registry import TeacherEntry, register_teacher

NAME = "dlib_resnet_v1"


def check_faces(faces: np.ndarray) -> None:
    """Refuse anything but aligned 112x112 RGB uint8 NHWC crops."""
    if faces.ndim != 4 or faces.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or faces.dtype != np.uint8:
        raise ValueError(f"expected aligned faces as uint8 (N, {CROP_SIZE}, {CROP_SIZE}, 3), "
                         f"got {faces.dtype} {faces.shape}")


def crops_to_chips(faces: np.ndarray, matrix: np.ndarray = CROP_TO_CHIP) -> list[np.ndarray]:
    """dlib 150x150 chips (RGB uint8) of aligned 112x112 RGB uint8 NHWC crops; outside the crop is black."""
    check_faces(faces)
    return [cv2.warpAffine(face, matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
            for face in faces]


@dataclass
class DlibResNet:
    """The loaded network: `embed` warps crops to chips and runs dlib's batched descriptor."""

    model: Any  # dlib.face_recognition_model_v1
    digest: str
    name: str = NAME
    embedding_size: int = 128
    batch_size: int = 32

    def embed(self, faces: np.ndarray) -> np.ndarray:
        check_faces(faces)
        outputs = [np.array(self.model.compute_face_descriptor(crops_to_chips(faces[start : start + self.batch_size])))
                   for start in range(0, len(faces), self.batch_size)]
        if not outputs:
            return np.zeros((0, self.embedding_size), np.float32)
        return l2_normalise(np.concatenate(outputs).astype(np.float64)).astype(np.float32)


def chip_agreement(teacher: DlibResNet, alignments: Sequence[PhotoAlignment], matrix: np.ndarray) -> np.ndarray:
    """Per photo, cosine between the embedding of dlib's own chip of the face and that of the shared data's
    aligned crop warped by `matrix`: how closely a crop -> chip affine reproduces dlib's alignment."""
    usable = [a for a in alignments if a.dlib_chip is not None and a.reference_crop is not None]
    if not usable:
        raise ValueError("no photo has both dlib's chip and a reference crop")
    own = l2_normalise(np.array(teacher.model.compute_face_descriptor([a.dlib_chip for a in usable])))
    crops = load_images([a.reference_crop for a in usable if a.reference_crop is not None], CROP_SIZE)
    warped = l2_normalise(np.array(teacher.model.compute_face_descriptor(crops_to_chips(crops, matrix))))
    return np.sum(own * warped, axis=1)


def load(device: str = "cpu") -> DlibResNet:
    """The network from the checked model file (dlib runs on the CPU whatever `device` says)."""
    import dlib

    path = model_file(RESNET_V1)  # checked against RESNET_V1.sha256, so the digest is the pinned one
    return DlibResNet(model=dlib.face_recognition_model_v1(str(path)), digest=RESNET_V1.sha256)


register_teacher(TeacherEntry(
    name=NAME,
    loader=load,
    embedding_size=128,
    licence="CC0 1.0 (dlib-models; packaged in face_recognition_models 0.3.0)",
    provenance="dlib ResNet v1 (D. E. King, 2017): about 3 M faces of 7,485 identities (face scrub, VGG, web "
               "scrapes), chosen to exclude LFW identities",
    lfw_identity_free=True,
    published_lfw=0.9938,
    source="PyPI sdist face_recognition_models==0.3.0, models/dlib_face_recognition_resnet_model_v1.dat "
           "(`make` fetches it into .cache/); runs in the dlib-bin==20.0.1.post1 wheel",
    files=lambda: [model_file(RESNET_V1)],
    model_folder=MODEL_FOLDER,
))
