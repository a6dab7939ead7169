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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from factory import distributed
from factory.benchmarks import read_pairs
from factory.data import to_input_tensor
from factory.distill import Distiller
from factory.distributed import Ranks
from factory.errors import FactoryError
from factory.evaluation import EvaluationSet
from factory.io import atomic_path
from factory.losses import SoftmaxHead, triplet_loss
from factory.models import create_model, model_entry
from factory.partial_fc import ShardedMarginHead
from factory.recipe import Recipe, TrainConfig, data_path
from factory.teachers import teacher_card
from factory.teachers.cache import cache_root
from factory.training_data import training_faces
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
    if isinstance(head, ArcFaceHead) or (isinstance(head, ShardedMarginHead) and head.ranks.world_size == 1):
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


def _gather_sharded(head: nn.Module, optimizer: torch.optim.SGD) -> dict[str, torch.Tensor]:
    """A sharded head's whole centre matrix and momentum (collectives); nothing for other heads."""
    if not isinstance(head, ShardedMarginHead):
        return {}
    gathered = {"head.weight": head.full_weight()}
    buffer = optimizer.state.get(head.weight, {}).get("momentum_buffer")
    if buffer is not None:
        gathered["head.weight.momentum"] = head.gather_classes(buffer)
    return gathered


def _save_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.SGD,
                     gathered: dict[str, torch.Tensor], meta: dict) -> None:
    """Model, head and optimiser state in one safetensors file; a sharded head's tensors whole (`gathered`).

    Whole tensors let a run resume with another number of processes.
    """
    tensors = {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    head_weight = getattr(modules.get("head"), "weight", None)
    for index, param in enumerate(params):
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if param is head_weight and "head.weight" in gathered:
            buffer = gathered.get("head.weight.momentum")
        if buffer is not None:
            tensors[f"momentum.{index}"] = buffer
    if "head.weight" in gathered:
        tensors["head.weight"] = gathered["head.weight"]
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
    head = modules.get("head")
    sharded = isinstance(head, ShardedMarginHead)
    for prefix, module in modules.items():
        state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        if module is head and sharded:
            head.load_full_weight(state.pop("weight"))
            continue
        module.load_state_dict(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        key = f"momentum.{index}"
        if key in tensors:
            buffer = tensors[key]
            if sharded and param is head.weight:
                buffer = head.local_classes(buffer)
            optimizer.state[param]["momentum_buffer"] = buffer.to(param.device)
    return meta


def _make_head(cfg: TrainConfig, embedding_size: int, num_classes: int, ranks: Ranks | None = None) -> nn.Module:
    """The classifier trained with the model; the triplet loss has none (an empty module keeps checkpoints uniform)."""
    if cfg.sharded_head:
        # Its gradient to the embeddings is scaled by the world size to undo DDP's averaging of the backbone's.
        return ShardedMarginHead(embedding_size, num_classes, cfg.arcface_scale, cfg.arcface_margin,
                                 sample_rate=cfg.head_sample_rate, ddp_backbone=ranks is not None and ranks.distributed,
                                 seed=cfg.seed)
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


class _Objective(nn.Module):
    """The per-step loss of the model, its head and the distillation projections: the unit DDP wraps."""

    def __init__(self, model: nn.Module, head: nn.Module, distiller: Distiller | None, cfg: TrainConfig,
                 forward_model: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.head, self.distiller, self.cfg = model, head, distiller, cfg
        # A torch.compile'd view of the same parameters; the plain model stays the one checkpointed.
        self.forward_model = forward_model if forward_model is not None else model

    def forward(self, x: torch.Tensor, y: torch.Tensor, labelled_total: int, world: int,
                targets: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        chunk = self.cfg.micro_batch
        if chunk and len(x) > chunk:
            # Chunks of equal size (none of a single face, which batch norm cannot normalise); each chunk's graph
            # is kept and one backward pass goes through all of them.
            parts_count = -(-len(x) // chunk)
            embeddings = torch.cat([self.forward_model(part) for part in x.tensor_split(parts_count)]).float()
        else:
            embeddings = self.forward_model(x).float()
        parts: dict[str, torch.Tensor] = {}
        if self.cfg.loss == "triplet":
            parts["label"] = triplet_loss(embeddings, y, self.cfg.triplet_margin)
        elif isinstance(self.head, ShardedMarginHead):
            known = y >= 0  # the sharded head returns the global batch's mean itself
            parts["label"] = self.head(embeddings[known], y[known])
        else:
            # The mean over the global batch's labelled faces: DDP averages the ranks' gradients, so each rank
            # scales its sum by world / (labelled faces of all ranks). In one process: the plain mean.
            known = y >= 0
            losses = F.cross_entropy(self.head(embeddings[known], y[known]), y[known], reduction="sum")
            parts["label"] = losses * world / max(labelled_total, 1)
        loss = parts["label"]
        if self.distiller is not None:
            parts.update(self.distiller.losses(embeddings, targets))
            loss = self.cfg.distill.label_weight * parts["label"] + self.distiller.total(parts)
        parts["total"] = loss
        return parts


def _check_ranks(cfg: TrainConfig, ranks: Ranks, device: str) -> None:
    if cfg.batch_size % ranks.world:
        raise FactoryError(f"train.batch_size {cfg.batch_size} is the global batch, split evenly over {ranks.world} "
                           f"processes: make it a multiple of {ranks.world}, or start that many fewer processes")
    if cfg.loss == "triplet" and (cfg.batch_size // ranks.world) % 2:
        raise FactoryError(f"triplet batches hold 2 images of each identity, so each of the {ranks.world} processes "
                           f"needs an even share of train.batch_size {cfg.batch_size}: make it a multiple of "
                           f"{2 * ranks.world}")
    if cfg.sync_batchnorm and not device.startswith("cuda"):
        raise FactoryError("train.sync_batchnorm synchronises batch norm across GPUs; PyTorch has no CPU version: "
                           "set it to false to train on CPUs")
    if cfg.precision == "fp16" and not device.startswith("cuda"):
        raise FactoryError("train.precision fp16 needs a GPU (its gradient scaler is CUDA's); use bf16 or fp32 on "
                           "CPUs")


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

    Launched by torchrun (`torchrun --nproc_per_node=N -m factory train RECIPE`), the processes train one
    model together with DistributedDataParallel (`factory.distributed`); only rank 0 logs, evaluates,
    checkpoints and writes the weights.

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
    ranks, device = distributed.start(device)
    _check_ranks(cfg, ranks, device)
    if not ranks.main:
        evaluate, held_out, evaluate_every_epoch = None, None, False

        def log(_: str) -> None:
            pass
    summary = _train(recipe, cfg, output, device, ranks, evaluate, log, evaluate_every_epoch, held_out)
    distributed.stop(ranks)
    return summary


def _train(recipe: Recipe, cfg: TrainConfig, output: Path, device: str, ranks: Ranks,
           evaluate: Callable[[nn.Module], dict[str, float]] | None, log: Callable[[str], None],
           evaluate_every_epoch: bool, held_out: EvaluationSet | None) -> dict:
    _seed_everything(cfg.seed)
    cuda = device.startswith("cuda")
    spec = recipe.model.input
    unlabelled = _unlabelled_faces(recipe)
    faces = training_faces(recipe, cfg, ranks, unlabelled, device, log)
    where = f"{ranks.world} processes ({ranks.backend}), device {device.split(':')[0]}" if ranks.distributed \
        else f"device {device}"
    log(f"training {recipe.model.architecture}: {faces.labelled_count} images, {len(faces.identities)} identities"
        f"{f', {faces.unlabelled_count} unlabelled faces' if faces.unlabelled_count else ''}, {where}")

    # channels_last roughly doubles CPU training speed of depthwise-heavy networks (the registry says where not).
    channels_last = model_entry(recipe.model.architecture).channels_last_training
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(recipe.model.architecture, **recipe.model.builder_kwargs())
    init_sha256 = None  # hashed now: the run's record must not depend on the file still being there at the end
    if cfg.init_from is not None:
        init_sha256 = sha256_of(recipe.resolve(cfg.init_from))
        load_weights(model, recipe.resolve(cfg.init_from))
        log(f"initialised from {cfg.init_from}")
    if cfg.sync_batchnorm and ranks.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format)
    head = _make_head(cfg, recipe.model.embedding_size, len(faces.identities), ranks).to(device)
    distiller = None
    if cfg.distill is not None:
        # Rank 0 fills the teacher-embedding cache first; the others then read it instead of racing to write it.
        if not ranks.main:
            distributed.barrier(ranks)
        distiller = Distiller(cfg.distill, recipe.model.embedding_size, faces.images, cfg.seed,
                              cache_root(cfg.distill.cache_dir, recipe.resolve), device, log).to(device)
        if ranks.main:
            distributed.barrier(ranks)
    if cfg.augmentation == "strong":  # stable per-face keys of the strong views, computed once
        faces.use_view_keys(distiller.keys if distiller is not None else None,
                            cfg.distill.cached_views if distiller and distiller.cached else None)
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
    objective: nn.Module = _Objective(model, head, distiller, cfg, torch.compile(model) if cfg.compile else None)
    if ranks.distributed:
        if isinstance(head, ShardedMarginHead):  # each rank holds other centres: never average them
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                objective, [f"head.{name}" for name, _ in head.named_parameters()])
        objective = DistributedDataParallel(objective, device_ids=[ranks.local_rank] if cuda else None)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
                              enabled=cfg.precision != "fp32")
    steps_per_epoch = faces.steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    monitor_images, monitor_labels = faces.monitor(cfg.seed) if ranks.main else (None, None)
    monitor_x = monitor_y = None
    if ranks.main:
        monitor_x = torch.from_numpy(
            to_input_tensor(monitor_images, spec.mean, spec.std, "NCHW", spec.color_order)
        ).to(device, memory_format=memory_format)
        monitor_y = torch.from_numpy(monitor_labels).to(device)
    held_out_teacher = distiller.teacher_embeddings(held_out.pixels_nhwc) if distiller and held_out else None
    checkpoint = output.parent / f"{output.stem}.ckpt" / "last.safetensors"
    start_epoch, start_batch, history, partial, grad_scale = 0, 0, [], {}, 2.0**16
    if checkpoint.is_file():
        meta = _load_checkpoint(checkpoint, trained, optimizer)
        if not _same_settings(meta.get("train_config"), cfg):
            raise FactoryError(
                f"checkpoint {checkpoint} was made with other training settings; delete it to start over"
            )
        start_epoch, history = meta["epoch"], meta["history"]
        start_batch, partial = meta.get("batch", 0), meta.get("partial", {})
        grad_scale = meta.get("grad_scale", grad_scale)
        log(f"resumed from {checkpoint} after epoch {start_epoch}"
            f"{f' and {start_batch} steps of the next' if start_batch else ''}"
            f"{f' (restart {ranks.restart} of the process group)' if ranks.restart else ''}")
    distributed.same_on_all(ranks, (start_epoch, start_batch), "the checkpoint to resume from")
    if isinstance(head, ShardedMarginHead):  # its negative sampling is a function of the step: repeat it exactly
        head.sampling_step = start_epoch * steps_per_epoch + start_batch
    # fp16 scales the loss so small gradients survive; a resumed run goes on with the scale it had reached.
    scaler = torch.amp.GradScaler("cuda", init_scale=grad_scale, enabled=cfg.precision == "fp16")

    def save(epoch: int, batch: int, partial: dict) -> None:
        gathered = _gather_sharded(head, optimizer)  # a collective: every rank takes part
        if ranks.main:
            _save_checkpoint(checkpoint, trained, optimizer, gathered,
                             {"epoch": epoch, "batch": batch, "partial": partial, "history": history,
                              "train_config": asdict(cfg), **({"grad_scale": scaler.get_scale()} if scaler.is_enabled()
                                                              else {})})

    started = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0) - partial.get("elapsed_s", 0.0)
    for epoch in range(start_epoch, cfg.epochs):
        first = start_batch if epoch == start_epoch else 0
        for module in trained.values():
            module.train()
        sums: dict[str, float] = dict(partial.get("sums", {})) if first else {}
        seen = partial.get("seen", 0) if first else 0
        epoch_started = time.perf_counter() - (partial.get("epoch_s", 0.0) if first else 0.0)
        progress = tqdm(zip(range(first, steps_per_epoch), faces.steps(epoch, first), strict=True),
                        total=steps_per_epoch - first, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                        mininterval=5, disable=not ranks.main)
        for batch_index, data in progress:
            step = epoch * steps_per_epoch + batch_index
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, total_steps, cfg.warmup_steps, cfg.learning_rate)
            x = torch.from_numpy(to_input_tensor(data.batch, spec.mean, spec.std, "NCHW", spec.color_order))
            x = x.to(device, memory_format=memory_format)
            y = torch.from_numpy(data.labels).to(device)
            targets = distiller.targets(data.index, data.views, data.batch) if distiller is not None else None
            with autocast:
                parts = objective(x, y, data.labelled_total, ranks.world, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item() * len(data.labels)
            seen += len(data.labels)
            progress.set_postfix(loss=f"{sums['total'] / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
            done = batch_index + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps_per_epoch:
                save(epoch, done, {"sums": sums, "seen": seen, "elapsed_s": time.perf_counter() - started
                                   - (history[-1]["elapsed_s"] if history else 0.0),
                                   "epoch_s": time.perf_counter() - epoch_started})
        epoch_s = time.perf_counter() - epoch_started
        totals = distributed.sum_across(ranks, {**sums, "seen": float(seen)}, device)
        seen_all = totals.pop("seen")
        elapsed = time.perf_counter() - started
        record: dict = {"epoch": epoch + 1, "loss": totals["total"] / seen_all, "elapsed_s": round(elapsed, 1),
                        "images_per_s": round(seen_all / epoch_s, 1)}
        if cuda:
            record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if distiller is not None:
            record["losses"] = {key: round(value / seen_all, 5) for key, value in totals.items() if key != "total"}
        loader = faces.epoch_record()
        record.update({key: value for key, value in loader.items() if key != "loader_summary"})
        history.append(record)
        monitor_started = time.perf_counter()
        if ranks.main:
            record["monitor"] = _monitor(model, head, monitor_x, monitor_y)
            if held_out is not None:
                record["held_out"] = _score_held_out(recipe, model, held_out, distiller, held_out_teacher, device)
            if evaluate is not None and evaluate_every_epoch:
                record["evaluation"] = evaluate(copy.deepcopy(model).cpu().eval())
                log(f"epoch {epoch + 1} evaluation: {record['evaluation']}")
        started += time.perf_counter() - monitor_started  # elapsed_s counts training only
        save(epoch + 1, 0, {})
        watch = ", ".join(f"{key} {value}" for key, value in {**record.get("losses", {}), **record.get("monitor", {}),
                                                               **record.get("held_out", {})}.items())
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} ({elapsed / 60:.1f} min, "
            f"{record['images_per_s']:.0f} images/s{_memory_note(record)}); {watch}")
        if "loader_summary" in loader:
            log(f"epoch {epoch + 1} data (rank 0): {loader['loader_summary']}")

    model.eval()
    spread = distributed.weights_spread(ranks, model)
    summary = {
        "architecture": recipe.model.architecture,
        "device": _device_name(device, ranks),
        "images": faces.labelled_count,
        "identities": len(faces.identities),
        "unlabelled_images": faces.unlabelled_count,
        "epochs": cfg.epochs,
        "train_config": asdict(cfg),
        **({"init_from_sha256": init_sha256} if init_sha256 else {}),
        "history": history,
        "wall_time_s": history[-1]["elapsed_s"] if history else 0.0,
    }
    if ranks.distributed:
        summary["distributed"] = {"world_size": ranks.world, "backend": ranks.backend, "restarts": ranks.restart,
                                  "weights_spread_across_ranks": spread}
        log(f"{ranks.world} ranks finished; largest weight difference between ranks: {spread:.3g}")
    if distiller is not None:
        summary["teachers"] = {name: teacher_card(name, teacher.digest) for name, teacher in distiller.teachers.items()}
        if distiller.centres:
            summary["teacher_centre_norms"] = distiller.centre_norms()
    if not ranks.main:
        return summary
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


def _device_name(device: str, ranks: Ranks) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    return f"{ranks.world} x {name}" if ranks.distributed else name


def _memory_note(record: dict) -> str:
    return f", {record['gpu_memory_gib']} GiB GPU memory" if "gpu_memory_gib" in record else ""


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
