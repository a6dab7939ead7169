"""Batches through a PyTorch-kernel function on every core, with numbers that do not depend on the core count.

The reference embeddings and the Core ML reference interpreter run PyTorch CPU kernels. With several intra-op
threads, oneDNN picks its blocking (and so its summation order) by thread count: MobileFaceNet's W8A8 Core ML
program gave embeddings 0.02 apart at 1 and 2 threads, where a float difference flips an int8 rounding. Here
each batch runs on one intra-op thread, and batches run side by side in a pool of Python threads (PyTorch
releases the GIL inside its kernels). Every batch is then computed the same way on any machine, whatever its
core count, and the pool still uses every core: on the 2-core build machine, 2 workers of 1 thread embed
MobileFaceNet faces 1.3x faster than 1 worker of 2 threads (per-op Python overhead overlaps too).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from factory.latency import all_threads


def map_batches(run: Callable[[np.ndarray], np.ndarray], items: np.ndarray, batch_size: int,
                workers: int | None = None) -> np.ndarray:
    """`run` on consecutive batches of `items` (dimension 0), concatenated in order.

    Args:
        run: Maps a batch to one output row per item; must be safe to call from several threads at once.
        items: The inputs, batch in dimension 0.
        batch_size: Items per call.
        workers: Threads running batches side by side (default: every core this process may use).
    """
    starts = range(0, len(items), batch_size)
    with ThreadPoolExecutor(max(1, min(workers or all_threads(), len(starts))),
                            initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return np.concatenate(list(pool.map(lambda start: run(items[start : start + batch_size]), starts)))
