"""Readers for the verification benchmark formats users already have.

- LFW `pairs.txt` (View 2): "folds n" header, then per fold n same pairs ("name i j") and n different
  pairs ("name_a i name_b j"); images at `<root>/<name>/<name>_<i:04d>.jpg`.
- Simple pair lists: "path_a path_b same" per line (same = 1/0/true/false), paths relative to the
  image root; split into 10 contiguous folds for the protocol.
- insightface `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...): a pickle of (list of encoded
  images, list of bools), consecutive images forming a pair. Pickles can run code, so they are read with
  an unpickler that builds only bytes, strings, lists, tuples and bools and refuses anything else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import cv2
import numpy as np

from factory.data import Pair, read_lfw_pairs, require_file
from factory.errors import FactoryError

FOLDS = 10


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: no class, function or module can be loaded.

    The one exception is `_codecs.encode`, which pickle protocol 2 uses to store `bytes` objects
    written by Python 3; it only turns a string into bytes.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: only plain data is allowed")


def read_insightface_bin(path: Path) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and same/different flags of an insightface `.bin` pair file, loaded safely."""
    require_file(path, "benchmark .bin file", "check data.evaluation.pairs")
    try:
        data = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise FactoryError(f"{path} is not a plain insightface pair file and was not loaded: {error}") from None
    if (not isinstance(data, (tuple, list)) or len(data) != 2 or not isinstance(data[0], list)
            or not isinstance(data[1], list)):
        raise FactoryError(f"{path}: expected (list of images, list of bools), got {type(data).__name__}")
    images, flags = data
    if not all(isinstance(item, (bytes, bytearray)) for item in images):
        raise FactoryError(f"{path}: the image list holds something other than encoded image bytes")
    if not all(isinstance(flag, bool) for flag in flags) or len(images) != 2 * len(flags):
        raise FactoryError(f"{path}: expected one bool per pair and two images per pair "
                           f"({len(images)} images, {len(flags)} flags)")
    return [bytes(item) for item in images], np.array(flags, dtype=bool)


def decode_images(encoded: list[bytes], size: int, source: Path) -> np.ndarray:
    """Decode encoded images to an RGB uint8 NHWC array of `size` x `size`."""
    out = np.empty((len(encoded), size, size, 3), np.uint8)
    for index, blob in enumerate(encoded):
        image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise FactoryError(f"{source}: image {index} cannot be decoded")
        if image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        out[index] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return out


def read_simple_pairs(pairs_file: Path, image_root: Path) -> list[Pair]:
    """Read "path_a path_b same" lines; folds are 10 contiguous blocks."""
    require_file(pairs_file, "pairs file", "check data.evaluation.pairs")
    rows = []
    for number, line in enumerate(pairs_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2].lower() not in ("0", "1", "true", "false"):
            raise FactoryError(f"{pairs_file}:{number}: expected 'path_a path_b same' (same = 0/1), got {line!r}")
        rows.append((image_root / fields[0], image_root / fields[1], fields[2].lower() in ("1", "true")))
    if len(rows) < FOLDS:
        raise FactoryError(f"{pairs_file}: {len(rows)} pairs; the protocol needs at least {FOLDS}")
    return [Pair(a, b, same, index * FOLDS // len(rows)) for index, (a, b, same) in enumerate(rows)]


def read_pairs(pairs_file: Path, image_root: Path) -> list[Pair]:
    """LFW `pairs.txt` or a simple pair list, told apart by the first line."""
    require_file(pairs_file, "pairs file", "check data.evaluation.pairs")
    first = pairs_file.read_text().split("\n", 1)[0].split()
    is_lfw = len(first) == 2 and all(field.isdigit() for field in first)
    return read_lfw_pairs(pairs_file, image_root) if is_lfw else read_simple_pairs(pairs_file, image_root)
