"""Training a face embedding model with an additive angular margin (ArcFace) head, or another loss.

ArcFace: Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", CVPR 2019. `train.loss` picks ArcFace (default), plain softmax cross-entropy, or the triplet
loss with online semi-hard selection on P identities x 2 images batches (`factory.losses`).
Checkpoints are safetensors files (model, head and optimiser state) with the step counters in the
file's metadata, so resuming never unpickles anything.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from factory.augment import basic_batch, face_keys, strong_views
from factory.benchmarks import read_pairs
from factory.data import load_images, read_split, to_input_tensor
from factory.distill import Distiller
from factory.errors import FactoryError
from factory.evaluation import EvaluationSet
from factory.io import atomic_path
from factory.losses import SoftmaxHead, identity_pair_batches, triplet_loss, triplet_steps_per_epoch
from factory.models import create_model, model_entry
from factory.recipe import Recipe, TrainConfig, data_path
from factory.teachers import teacher_card
from factory.teachers.cache import cache_root, face_digests
from factory.weights import load_weights, save_weights, sha256_of


class ArcFaceHead(nn.Module):
    """Additive angular margin logits: s * cos(theta + m) for the true class, s * cos(theta) otherwise."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        # Beyond theta = pi - m, cos(theta + m) stops decreasing; insightface's linear fallback.
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1.0, 1.0)
        sine = torch.sqrt((1.0 - cosine.square()).clamp_min(1e-7))
        with_margin = cosine * self.cos_m - sine * self.sin_m
        with_margin = torch.where(cosine > self.threshold, with_margin, cosine - self.fallback)
        one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return self.scale * (one_hot * with_margin + (1.0 - one_hot) * cosine)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-class scores without the margin (cosines), for classifying."""
        return F.linear(F.normalize(embeddings), F.normalize(self.weight))


# A trained embedding whose faces' mean pairwise cosine exceeds this has collapsed into a narrow cone:
# verification then fails (the failed SeesawFaceNet run: 0.76, LFW 56%), whatever the training loss says.
COLLAPSED_COSINE = 0.5
MONITOR_IMAGES = 512


def _monitor(model: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """How the model does on a fixed sample of its training faces, unaugmented, in eval mode.

    `embedding_cosine_mean`: mean cosine between different faces' embeddings (near 0 when they spread out,
    near 1 when collapsed). `train_top1`: share of faces the classifier head assigns to their identity
    (classifier losses only).
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model(x[i : i + 128]) for i in range(0, len(x), 128)])
    model.train(was_training)
    unit = F.normalize(embeddings)
    count = len(unit)
    cosine_mean = ((unit @ unit.T).sum() - count) / (count * (count - 1))
    result = {"embedding_cosine_mean": round(float(cosine_mean), 4)}
    if isinstance(head, ArcFaceHead):
        scores = head.scores(embeddings)
    elif isinstance(head, SoftmaxHead):
        with torch.no_grad():
            scores = head(embeddings, y)
    else:
        return result
    result["train_top1"] = round(float((scores.argmax(1) == y).float().mean()), 4)
    return result


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def _save_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.SGD, meta: dict) -> None:
    tensors = {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            tensors[f"momentum.{index}"] = buffer
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"factory": json.dumps(meta)})


def _load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.SGD) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {})["factory"])
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises several types for corrupt files
        raise FactoryError(
            f"checkpoint {path} is corrupt or not a factory checkpoint ({error}); delete it to start over"
        ) from None
    for prefix, module in modules.items():
        module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        key = f"momentum.{index}"
        if key in tensors:
            optimizer.state[param]["momentum_buffer"] = tensors[key].to(param.device)
    return meta


def _make_head(cfg: TrainConfig, embedding_size: int, num_classes: int) -> nn.Module:
    """The classifier trained with the model; the triplet loss has none (an empty module keeps checkpoints uniform)."""
    if cfg.loss == "arcface":
        return ArcFaceHead(embedding_size, num_classes, cfg.arcface_scale, cfg.arcface_margin)
    if cfg.loss == "softmax":
        return SoftmaxHead(embedding_size, num_classes)
    return nn.Identity()


def _same_settings(saved: dict | None, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's training settings are `cfg`'s.

    Settings added to `TrainConfig` after the checkpoint was written count as equal while at their defaults,
    so checkpoints from before the `loss` setting still resume.
    """
    if saved is None:
        return False
    current, defaults = asdict(cfg), asdict(TrainConfig(split=cfg.split))
    return {key: value for key, value in current.items() if key in saved or value != defaults[key]} == saved


def _unlabelled_faces(recipe: Recipe) -> list[Path]:
    """Faces of `train.distill.unlabelled`, refusing any in an evaluation identity's folder."""
    distill = recipe.train.distill if recipe.train is not None else None
    if distill is None or not distill.unlabelled:
        return []
    root = recipe.resolve(recipe.data.root)
    paths = [root / line.split("\t")[0] for split in distill.unlabelled
             for line in data_path(recipe, split).read_text().splitlines() if line.strip()]
    evaluation = recipe.data.evaluation
    pairs = [] if evaluation.pairs.endswith(".bin") else read_pairs(data_path(recipe, evaluation.pairs),
                                                                      data_path(recipe, evaluation.images))
    tested = {path.parent.resolve() for pair in pairs for path in (pair.path_a, pair.path_b)}
    leaked = [path for path in paths if path.parent.resolve() in tested]
    if leaked:
        raise FactoryError(f"train.distill.unlabelled lists {len(leaked)} faces of identities in the evaluation pairs "
                           f"(e.g. {leaked[0]}); training on them would make the held-out score dishonest — "
                           "remove them from the split")
    return paths


def train(
    recipe: Recipe,
    output: Path,
    device: str = "auto",
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[str], None] = print,
    evaluate_every_epoch: bool = False,
    held_out: EvaluationSet | None = None,
) -> dict:
    """Train the recipe's model on its training split and save the weights to `output`.

    Args:
        recipe: Validated recipe; `recipe.train` holds the schedule and loss settings.
        output: Where the final safetensors weights go. Checkpoints sit next to it in `<stem>.ckpt/`.
        device: "cpu", "cuda" or "auto".
        evaluate: Optional callback scoring the model (e.g. LFW accuracy) after training.
        log: Where progress lines go.
        evaluate_every_epoch: Also score the model after every epoch (kept in the history; learning curves).
        held_out: Faces and pairs never trained on, scored after every epoch (verification accuracy and,
            when distilling, the student-teacher cosine on their faces).

    Returns:
        A summary (hardware, wall time, epochs, final loss, evaluation) that is also written as JSON.
    """
    cfg = recipe.train
    if cfg is None:
        raise FactoryError(f"recipe {recipe.name!r} has no 'train' section; add one to train this model")
    _seed_everything(cfg.seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = recipe.model.input
    items = read_split(data_path(recipe, cfg.split), recipe.resolve(recipe.data.root))
    if cfg.identity_fraction < 1.0:
        identities = sorted({label for _, label in items})
        keep = round(cfg.identity_fraction * len(identities))
        chosen = set(np.random.default_rng(cfg.seed).permutation(identities)[:keep].tolist())
        items = [item for item in items if item[1] in chosen]
    labels_text = sorted({label for _, label in items})
    label_index = {label: i for i, label in enumerate(labels_text)}
    unlabelled = _unlabelled_faces(recipe)
    log(f"training {recipe.model.architecture}: {len(items)} images, {len(labels_text)} identities"
        f"{f', {len(unlabelled)} unlabelled faces' if unlabelled else ''}, device {device}")
    images = load_images([path for path, _ in items] + unlabelled, spec.size)
    labels = np.array([label_index[label] for _, label in items] + [-1] * len(unlabelled), np.int64)

    # channels_last roughly doubles CPU training speed of depthwise-heavy networks (the registry says where not).
    channels_last = model_entry(recipe.model.architecture).channels_last_training
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(recipe.model.architecture, **recipe.model.builder_kwargs())
    init_sha256 = None  # hashed now: the run's record must not depend on the file still being there at the end
    if cfg.init_from is not None:
        init_sha256 = sha256_of(recipe.resolve(cfg.init_from))
        load_weights(model, recipe.resolve(cfg.init_from))
        log(f"initialised from {cfg.init_from}")
    model = model.to(device, memory_format=memory_format)
    head = _make_head(cfg, recipe.model.embedding_size, len(labels_text)).to(device)
    distiller = None
    if cfg.distill is not None:
        distiller = Distiller(cfg.distill, recipe.model.embedding_size, images, cfg.seed,
                              cache_root(cfg.distill.cache_dir, recipe.resolve), device, log).to(device)
    view_keys = None  # stable per-face keys of the strong views, computed once
    if cfg.augmentation == "strong":
        view_keys = distiller.keys if distiller is not None else face_keys(face_digests(images))
    trained: dict[str, nn.Module] = {"model": model, "head": head}
    if distiller is not None:
        trained["projection"] = distiller.projections
    decay, no_decay = [], []
    for module in trained.values():
        for param in module.parameters():
            (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, momentum=0.9, nesterov=True,
    )
    if cfg.loss == "triplet":
        steps_per_epoch = triplet_steps_per_epoch(labels, cfg.batch_size // 2)
    else:
        steps_per_epoch = len(images) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    labelled = np.flatnonzero(labels >= 0)
    sample = labelled[np.random.default_rng(cfg.seed).permutation(len(labelled))[:MONITOR_IMAGES]]
    monitor_x = torch.from_numpy(
        to_input_tensor(images[sample], spec.mean, spec.std, "NCHW", spec.color_order)
    ).to(device, memory_format=memory_format)
    monitor_y = torch.from_numpy(labels[sample]).to(device)
    held_out_teacher = distiller.teacher_embeddings(held_out.pixels_nhwc) if distiller and held_out else None
    checkpoint = output.parent / f"{output.stem}.ckpt" / "last.safetensors"
    start_epoch, history = 0, []
    if checkpoint.is_file():
        meta = _load_checkpoint(checkpoint, trained, optimizer)
        if not _same_settings(meta.get("train_config"), cfg):
            raise FactoryError(
                f"checkpoint {checkpoint} was made with other training settings; delete it to start over"
            )
        start_epoch, history = meta["epoch"], meta["history"]
        log(f"resumed from {checkpoint} after epoch {start_epoch}")

    started = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng(cfg.seed + epoch)
        if cfg.loss == "triplet":
            batches = identity_pair_batches(labels, cfg.batch_size // 2, rng)
        else:
            order = rng.permutation(len(images))
            batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
        for module in trained.values():
            module.train()
        sums: dict[str, float] = {}
        seen = 0
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=5)
        for batch_index in progress:
            step = epoch * steps_per_epoch + batch_index
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, total_steps, cfg.warmup_steps, cfg.learning_rate)
            index = batches[batch_index]
            views = None
            if cfg.augmentation == "strong":
                views = rng.integers(0, cfg.distill.cached_views if distiller and distiller.cached else 1 << 62,
                                     size=len(index))
                batch = strong_views(images[index], view_keys[index], views, cfg.seed)
            else:
                batch = basic_batch(images[index], rng, cfg.max_shift)
            x = torch.from_numpy(to_input_tensor(batch, spec.mean, spec.std, "NCHW", spec.color_order))
            x = x.to(device, memory_format=memory_format)
            y = torch.from_numpy(labels[index]).to(device)
            embeddings = model(x)
            parts: dict[str, torch.Tensor] = {}
            if cfg.loss == "triplet":
                parts["label"] = triplet_loss(embeddings, y, cfg.triplet_margin)
            else:
                known = y >= 0
                parts["label"] = F.cross_entropy(head(embeddings[known], y[known]), y[known])
            loss = parts["label"]
            if distiller is not None:
                parts.update(distiller.losses(embeddings, distiller.targets(index, views, batch)))
                loss = cfg.distill.label_weight * parts["label"] + distiller.total(parts)
            parts["total"] = loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item() * len(index)
            seen += len(index)
            progress.set_postfix(loss=f"{sums['total'] / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
        elapsed = time.perf_counter() - started
        record: dict = {"epoch": epoch + 1, "loss": sums["total"] / seen, "elapsed_s": round(elapsed, 1)}
        if distiller is not None:
            record["losses"] = {key: round(value / seen, 5) for key, value in sums.items() if key != "total"}
        history.append(record)
        monitor_started = time.perf_counter()
        record["monitor"] = _monitor(model, head, monitor_x, monitor_y)
        if held_out is not None:
            record["held_out"] = _score_held_out(recipe, model, held_out, distiller, held_out_teacher, device)
        started += time.perf_counter() - monitor_started  # elapsed_s counts training only
        if evaluate is not None and evaluate_every_epoch:
            scoring_started = time.perf_counter()
            record["evaluation"] = evaluate(copy.deepcopy(model).cpu().eval())
            started += time.perf_counter() - scoring_started  # elapsed_s counts training only
            log(f"epoch {epoch + 1} evaluation: {record['evaluation']}")
        _save_checkpoint(checkpoint, trained, optimizer,
                         {"epoch": epoch + 1, "history": history, "train_config": asdict(cfg)})
        watch = ", ".join(f"{key} {value}" for key, value in {**record.get("losses", {}), **record["monitor"],
                                                               **record.get("held_out", {})}.items())
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} ({elapsed / 60:.1f} min); {watch}")

    model.eval()
    summary = {
        "architecture": recipe.model.architecture,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "images": len(items),
        "identities": len(labels_text),
        "unlabelled_images": len(unlabelled),
        "epochs": cfg.epochs,
        "train_config": asdict(cfg),
        **({"init_from_sha256": init_sha256} if init_sha256 else {}),
        "history": history,
        "wall_time_s": history[-1]["elapsed_s"] if history else 0.0,
    }
    if distiller is not None:
        summary["teachers"] = {name: teacher_card(name, teacher.digest) for name, teacher in distiller.teachers.items()}
    final = _monitor(model, head, monitor_x, monitor_y)
    summary["monitor"] = final
    if final["embedding_cosine_mean"] > COLLAPSED_COSINE:
        summary["collapsed"] = True
        log(f"WARNING: the embeddings collapsed: different training faces have mean cosine "
            f"{final['embedding_cosine_mean']} (> {COLLAPSED_COSINE}), so they cannot tell people apart. "
            f"Check the architecture for saturating units (a hard-sigmoid gate did this to SeesawFaceNet) or lower "
            f"train.learning_rate, and train again")
    if evaluate is not None:
        summary["evaluation"] = evaluate(model.cpu())
        log(f"evaluation: {summary['evaluation']}")
    save_weights(model.cpu(), output, {"architecture": recipe.model.architecture, "training": json.dumps(summary)})
    with atomic_path(output.with_suffix(".train.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _score_held_out(recipe: Recipe, model: nn.Module, held_out: EvaluationSet, distiller: Distiller | None,
                    teacher: dict[str, np.ndarray] | None, device: str) -> dict[str, float]:
    """Verification accuracy on the held-out pairs and the student-teacher cosine on their faces."""
    spec = recipe.model.input
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pixels = to_input_tensor(held_out.pixels_nhwc, spec.mean, spec.std, "NCHW", spec.color_order)
        embeddings = torch.cat([model(torch.from_numpy(pixels[i : i + 256]).to(device))
                                for i in range(0, len(pixels), 256)])
    model.train(was_training)
    result = held_out.verification(F.normalize(embeddings, dim=1).cpu().numpy())
    scores = {"held_out_accuracy": round(float(result["accuracy"]), 4), "held_out_pairs": len(held_out.pairs)}
    if distiller is not None and teacher is not None:
        scores.update({f"cosine_to_{name}": value for name, value in distiller.agreement(embeddings, teacher).items()})
    return scores
