"""Five-point alignment onto the standard ArcFace 112x112 template."""

from __future__ import annotations

import cv2
import numpy as np

# Left eye, right eye, nose tip, left and right mouth corners, in a 112x112 crop (insightface).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def similarity_transform(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, translation) mapping `landmarks` onto the template.

    Uses OpenCV's robust estimator (LMEDS), the method the shared reference crops were made with.
    """
    template = ARCFACE_TEMPLATE * (size / 112.0)
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate: no similarity transform fits them")
    return matrix


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp an RGB image so the five landmarks land on the template; outside the photo is black."""
    matrix = similarity_transform(landmarks, size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
