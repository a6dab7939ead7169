"""Distributed data-parallel training with torchrun on this CPU machine: 2 gloo ranks on real faces.

The ranks must train (the loss falls), end with the same weights, and survive one rank being killed: started
again, every rank resumes from the last checkpoint, and the run ends with the weights of a run that was never
interrupted. (torchrun's in-place `--max-restarts` does the same restart; on this loopback-only machine its
restarted gloo group sometimes fails to connect, so the test starts torchrun again itself.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO

from factory.models import create_model
from factory.weights import load_weights

pytestmark = pytest.mark.data

IDENTITIES = 32
PER_IDENTITY = 6
EPOCHS = 3


def _split(faces_root: Path, out: Path) -> int:
    """The first IDENTITIES training identities with PER_IDENTITY images or more, PER_IDENTITY of each."""
    by_identity: dict[str, list[str]] = defaultdict(list)
    for line in (faces_root / "splits" / "train.txt").read_text().splitlines():
        path, label = line.split("\t")
        by_identity[label].append(path)
    chosen = [(label, paths[:PER_IDENTITY]) for label, paths in by_identity.items() if len(paths) >= PER_IDENTITY]
    lines = [f"{path}\t{label}" for label, paths in chosen[:IDENTITIES] for path in paths]
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def _recipe(tmp_path: Path, faces_root: Path, name: str, **train: object) -> Path:
    split = tmp_path / "split.txt"
    if not split.exists():
        _split(faces_root, split)
    data = {
        "name": name,
        "model": {"architecture": "mobilefacenet", "embedding_size": 128},
        "weights": {"path": f"{name}.safetensors"},
        "train": {"split": str(split), "epochs": EPOCHS, "batch_size": 32, "warmup_steps": 2, "learning_rate": 0.05,
                  **train},
        "data": {
            "root": str(faces_root),
            "calibration": {"split": str(split), "count": 8, "allow_fewer_than_300": True},
            "evaluation": {"pairs": "lfw/pairs.txt", "images": "lfw/aligned", "min_parity_images": 4,
                           "max_pairs": 40},
        },
        "targets": [{"format": "tflite", "precisions": ["fp32"]}],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "factory", "train", str(recipe), "--device", "cpu", "--threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 600, returncode: int = 0) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # never leave ranks behind: they would join the next run's rendezvous
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == returncode, output[-3000:]
    return output


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of `launcher` (torchrun) that has RANK=rank in its environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(create_model("mobilefacenet"), path).state_dict()


def _history(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.train.json").read_text())


def test_two_ranks_train_together_from_recordio(tmp_path: Path, faces_root: Path) -> None:
    """The faces as insightface RecordIO, read while training by one DataLoader worker per rank."""
    from factory.face_data import convert, open_source

    _split(faces_root, tmp_path / "split.txt")
    rec = tmp_path / "rec" / "train.rec"
    convert(open_source(tmp_path / "split.txt", "list", root=faces_root), "recordio", rec)
    recipe = _recipe(tmp_path, faces_root, "plain", split=str(rec), loader_workers=1)
    output = _finish(_torchrun(recipe))
    summary = _history(tmp_path, "plain")
    assert all(record["loader"]["bad"] == {} and record["loader"]["records"] == 96  # rank 0: 6 steps x 16
               for record in summary["history"]), summary["history"]
    assert summary["images"] == IDENTITIES * PER_IDENTITY and summary["identities"] == IDENTITIES
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["backend"] == "gloo"
    losses = [record["loss"] for record in summary["history"]]
    assert len(losses) == EPOCHS and losses[-1] < 0.9 * losses[0], losses
    # DDP averages the gradients: the ranks end with the same parameters, which shows the sync works.
    assert summary["distributed"]["weights_spread_across_ranks"] < 1e-6
    assert all(record["images_per_s"] > 0 for record in summary["history"])
    assert output.count(f"epoch 1/{EPOCHS}: loss") == 1, "only rank 0 logs"


def test_sharded_head_run_resumes_after_a_rank_is_killed(tmp_path: Path, faces_root: Path) -> None:
    """Partial-FC head with sampled negatives: checkpoints gather its centres, a restart scatters them again."""
    sharded = {"sharded_head": True, "head_sample_rate": 0.5}
    straight = _recipe(tmp_path, faces_root, "straight", **sharded)
    _finish(_torchrun(straight))
    summary = _history(tmp_path, "straight")
    losses = [record["loss"] for record in summary["history"]]
    assert losses[-1] < 0.9 * losses[0], losses
    assert summary["distributed"]["weights_spread_across_ranks"] < 1e-6

    killed = _recipe(tmp_path, faces_root, "killed", **sharded)
    checkpoint = tmp_path / "killed.ckpt" / "last.safetensors"
    launcher = _torchrun(killed)
    deadline = time.monotonic() + 600
    while not checkpoint.exists():  # the first epoch's checkpoint
        if launcher.poll() is not None or time.monotonic() > deadline:
            _finish(launcher, timeout=1)
            pytest.fail("the run ended or hung before its first checkpoint")
        time.sleep(0.05)
    pid = _rank_pid(launcher.pid, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    # torchrun stops the other rank and fails; started again (as a scheduler resubmits a failed job), every rank
    # resumes from the last checkpoint.
    failed = _finish(launcher, returncode=1)
    assert "exitcode: -9" in failed and not (tmp_path / "killed.safetensors").exists(), failed[-3000:]
    output = _finish(_torchrun(killed))
    assert "resumed from" in output, output[-3000:]
    resumed = _history(tmp_path, "killed")
    assert resumed["distributed"]["weights_spread_across_ranks"] < 1e-6
    assert [r["loss"] for r in resumed["history"]] == pytest.approx(losses, rel=1e-4)
    a, b = _weights(tmp_path / "straight.safetensors"), _weights(tmp_path / "killed.safetensors")
    for name, value in a.items():
        assert torch.allclose(value.float(), b[name].float(), atol=1e-5), name
