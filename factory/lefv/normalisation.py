"""LEFV's face normaliser: GAN training and how well it keeps identity.

The normaliser (`factory.lefv.normaliser_net.Normaliser`: frozen MobileFaceNet encoder, U-Net decoder)
turns an aligned face into a normalised one: frontal-looking, symmetric, evenly lit. The LEFV paper trains it
with four losses (its Eq. 5-9); this module uses, per batch of aligned training faces x:

    adversarial   LSGAN: the PatchGAN discriminator D learns (D(real) - 1)^2 + D(G(x))^2, where "real" are the
                  most frontal training faces (`frontal_fraction` of them, by the landmarks' yaw); G minimises
                  (D(G(x)) - 1)^2
    identity      1 - cos(E(G(x)), E(x)), E the frozen MobileFaceNet (encoder and embedding): the normalised face
                  must stay the same person
    pixel         |G(x) - x_frontal|_1, x_frontal the most frontal training photo of x's identity (x itself when
                  it is the only one); there are no paired frontal captures here, so this is the nearest target
    symmetry      |G(x) - flip(G(x))|_1

Yaw is estimated from the five source landmarks of each face (`*/landmarks.csv`): the nose's offset from the
eyes' midpoint along the eye line, over the inter-ocular distance (0 for a frontal face, about +-0.3 in
profile-leaning photos). Faces without landmarks (glint) are never "real" and are their own pixel target.

What it is scored by (`identity_report`), on held-out LFW faces and with the pipeline's own recogniser (not the
MobileFaceNet the identity loss used): the cosine between each face's embedding before and after normalisation,
and LFW verification accuracy with and without normalising both faces of each pair.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.data import load_images, read_split
from factory.deploy import Embedder
from factory.errors import FactoryError
from factory.evaluation import EvaluationSet, torch_embeddings
from factory.io import atomic_path
from factory.lefv.config import NormaliserTrainConfig
from factory.lefv.normaliser_net import Normaliser, PatchDiscriminator
from factory.models.mobilefacenet import MobileFaceNet
from factory.recipe import Recipe, data_path
from factory.weights import load_weights, save_weights

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0


class DeployedNormaliser(nn.Module):
    """What normaliser artifacts compute: a face's pixels (NCHW, 0-255) in, the normalised face's pixels out."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels - PIXEL_MEAN) * (1.0 / PIXEL_SCALE)) * PIXEL_SCALE + PIXEL_MEAN


def yaw_proxy(landmarks: np.ndarray) -> float:
    """Signed yaw estimate of a face from its 5 landmarks (eyes, nose, mouth corners), in any photo's pixels:
    the nose's offset from the eyes' midpoint along the eye line, over the inter-ocular distance."""
    left_eye, right_eye, nose = landmarks[0], landmarks[1], landmarks[2]
    axis = right_eye - left_eye
    length = float(np.linalg.norm(axis))
    if length < 1e-6:
        return float("nan")
    return float(np.dot(nose - (left_eye + right_eye) / 2.0, axis / length) / length)


def read_landmarks(root: Path) -> dict[Path, np.ndarray]:
    """Source landmarks (5 x 2) of every aligned image listed in `root/*/landmarks.csv`, by resolved path;
    images aligned by the centre-crop fallback are left out."""
    table: dict[Path, np.ndarray] = {}
    for csv_path in sorted(root.glob("*/landmarks.csv")):
        with csv_path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if "image" not in row or row.get("fallback_center_crop") == "1":
                    continue
                values = np.array(row["landmarks_xy_source_pixels"].split(), np.float32)
                if values.size == 10:
                    table[(root / row["image"]).resolve()] = values.reshape(5, 2)
    return table


@dataclass
class NormaliserData:
    """Aligned training faces (NHWC uint8), each face's yaw (NaN: unknown), the index of its pixel target
    (its identity's most frontal face) and the indices of the frontal faces the discriminator sees as real."""

    images: np.ndarray
    yaw: np.ndarray
    target: np.ndarray
    frontal: np.ndarray


def prepare_data(items: list[tuple[Path, str]], images: np.ndarray, landmarks: dict[Path, np.ndarray],
                 frontal_fraction: float) -> NormaliserData:
    """Yaw, pixel targets and the frontal set for aligned faces `images` of the (path, identity) `items`."""
    yaw = np.array([yaw_proxy(landmarks[p.resolve()]) if p.resolve() in landmarks else np.nan
                    for p, _ in items], np.float32)
    magnitude = np.abs(yaw)
    best: dict[str, int] = {}
    for index, (_, label) in enumerate(items):
        if np.isnan(magnitude[index]):
            continue
        if label not in best or magnitude[index] < magnitude[best[label]]:
            best[label] = index
    target = np.array([best.get(label, index) for index, (_, label) in enumerate(items)], np.int64)
    known = np.flatnonzero(~np.isnan(magnitude))
    if len(known) == 0:
        raise FactoryError("no training face has landmarks (*/landmarks.csv under data.root), so no face is known "
                           "to be frontal; the normaliser cannot be trained")
    count = max(1, round(frontal_fraction * len(known)))
    frontal = known[np.argsort(magnitude[known], kind="stable")[:count]]
    return NormaliserData(images=images, yaw=yaw, target=target, frontal=np.sort(frontal))


def _batch(pixels: np.ndarray, flip: np.ndarray) -> torch.Tensor:
    """NHWC uint8 faces, mirrored where `flip`, as normalised NCHW float tensors."""
    out = pixels.copy()
    out[flip] = out[flip, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32))
    return (x - PIXEL_MEAN) / PIXEL_SCALE


def load_encoder(path: Path, sha256: str | None) -> MobileFaceNet:
    """The trained MobileFaceNet the normaliser encodes with (frozen, eval mode)."""
    return load_weights(MobileFaceNet(), path, sha256).eval()


def train_normaliser(data: NormaliserData, encoder: MobileFaceNet, cfg: NormaliserTrainConfig,
                     log: Callable[[str], None] = print,
                     evaluate: Callable[[nn.Module], dict] | None = None, evaluate_every: int = 0,
                     log_every: int = 50) -> tuple[Normaliser, list[dict]]:
    """Train a normaliser (decoder and discriminator; the encoder stays frozen); returns it and the log, one
    entry of mean losses per `log_every` steps.

    `evaluate` (every `evaluate_every` steps and at the end, on the eval-mode normaliser) adds scores to the log.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    generator = Normaliser(copy.deepcopy(encoder)).train()
    discriminator = PatchDiscriminator().train()
    optimiser_g = torch.optim.Adam(generator.decoder_parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
    optimiser_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
    history: list[dict] = []
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(cfg.steps):
        index = rng.integers(0, len(data.images), cfg.batch_size)
        flip = rng.random(cfg.batch_size) < 0.5
        x = _batch(data.images[index], flip)
        target = _batch(data.images[data.target[index]], flip)
        real = _batch(data.images[rng.choice(data.frontal, cfg.batch_size)], rng.random(cfg.batch_size) < 0.5)
        out = generator(x)

        loss_d = ((discriminator(real) - 1.0) ** 2).mean() + (discriminator(out.detach()) ** 2).mean()
        optimiser_d.zero_grad(set_to_none=True)
        loss_d.backward()
        optimiser_d.step()

        with torch.no_grad():
            identity_x = F.normalize(generator.encoder(x))
        identity_out = F.normalize(generator.encoder(out))
        losses = {
            "adversarial": ((discriminator(out) - 1.0) ** 2).mean(),
            "identity": (1.0 - (identity_x * identity_out).sum(1)).mean(),
            "pixel": (out - target).abs().mean(),
            "symmetry": (out - out.flip(3)).abs().mean(),
        }
        loss_g = (cfg.adversarial_weight * losses["adversarial"] + cfg.identity_weight * losses["identity"]
                  + cfg.pixel_weight * losses["pixel"] + cfg.symmetry_weight * losses["symmetry"])
        optimiser_g.zero_grad(set_to_none=True)
        loss_g.backward()
        optimiser_g.step()

        for name, value in {"discriminator": loss_d, "generator": loss_g, **losses}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        last = step + 1 == cfg.steps
        if (step + 1) % log_every == 0 or last:
            count = (step % log_every) + 1
            entry: dict = {"step": step + 1, "elapsed_s": round(time.perf_counter() - started, 1),
                           **{name: round(total / count, 5) for name, total in sums.items()}}
            sums = {}
            if evaluate is not None and (last or (evaluate_every and (step + 1) % evaluate_every == 0)):
                generator.eval()
                entry["evaluation"] = evaluate(generator)
                generator.train()
            history.append(entry)
            log(f"step {entry['step']}/{cfg.steps} ({entry['elapsed_s'] / 60:.1f} min): "
                + ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("step", "elapsed_s")))
    return generator.eval(), history


def normalise_pixels(deployed: nn.Module, pixels_nchw: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run a pixels-in, pixels-out normaliser graph over NCHW float faces in batches."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(pixels_nchw), batch_size):
            outputs.append(deployed(torch.from_numpy(pixels_nchw[start : start + batch_size])).numpy())
    return np.concatenate(outputs) if outputs else np.zeros_like(pixels_nchw)


def symmetry_error(pixels_nchw: np.ndarray) -> float:
    """Mean absolute difference (0-255 levels) between faces and their mirror images."""
    return float(np.abs(pixels_nchw - pixels_nchw[..., ::-1]).mean())


def identity_report(normalised: np.ndarray, original: np.ndarray, recogniser: Embedder,
                    evaluation: EvaluationSet) -> dict[str, float]:
    """How normalisation changes what `recogniser` sees, on an evaluation set's faces (NCHW pixels, in the
    evaluation set's image order): per-face embedding cosine before/after, and verification accuracy of the
    pairs with and without normalising both faces."""
    before = torch_embeddings(recogniser, np.ascontiguousarray(original))
    after = torch_embeddings(recogniser, np.ascontiguousarray(normalised))
    cosine = (before * after).sum(1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1) + 1e-12)
    plain, normal = evaluation.verification(before), evaluation.verification(after)
    return {
        "faces": len(original),
        "identity_cosine_mean": float(cosine.mean()), "identity_cosine_median": float(np.median(cosine)),
        "identity_cosine_p10": float(np.percentile(cosine, 10)),
        "accuracy_without": plain["accuracy"], "accuracy_with": normal["accuracy"],
        "accuracy_std_without": plain["accuracy_std"], "accuracy_std_with": normal["accuracy_std"],
        "threshold_with": normal["threshold"],
        "symmetry_error_before": symmetry_error(original), "symmetry_error_after": symmetry_error(normalised),
    }


def encoder_path(recipe: Recipe) -> Path:
    return recipe.resolve(recipe.pipeline.normaliser.encoder.path)


def train_normaliser_stage(recipe: Recipe, output: Path, log: Callable[[str], None] = print) -> dict:
    """`factory train RECIPE --stage normaliser`: train on the recipe's training split, score identity keeping on
    LFW with the recipe's recogniser, save weights and the log."""
    from factory.evaluation import load_evaluation_set
    from factory.models import load_backbone

    if recipe.pipeline is None or recipe.pipeline.normaliser is None:
        raise FactoryError(f"recipe {recipe.name!r} has no 'pipeline.normaliser' section, so no normaliser to train")
    if recipe.train is None:
        raise FactoryError(f"recipe {recipe.name!r} has no 'train' section naming the training split")
    cfg = recipe.pipeline.normaliser
    root = recipe.resolve(recipe.data.root)
    items = read_split(data_path(recipe, recipe.train.split), root)
    log(f"training the LEFV normaliser on {len(items)} aligned faces")
    data = prepare_data(items, load_images([p for p, _ in items], 112), read_landmarks(root),
                        cfg.train.frontal_fraction)
    encoder = load_encoder(encoder_path(recipe), cfg.encoder.sha256)
    spec = recipe.model.input
    recogniser = Embedder(load_backbone(recipe), spec.mean, spec.std, recipe.model.embedding_size).eval()
    mobilefacenet = Embedder(encoder, [PIXEL_MEAN] * 3, [PIXEL_SCALE] * 3, 128).eval()
    evaluation = load_evaluation_set(recipe)
    original = evaluation.pixels("NCHW")
    probe = slice(0, 512)

    def evaluate(generator: nn.Module) -> dict:
        normalised = normalise_pixels(DeployedNormaliser(generator), original[probe])
        before = torch_embeddings(recogniser, original[probe])
        after = torch_embeddings(recogniser, normalised)
        cosine = (before * after).sum(1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1))
        return {"lfw_faces": len(normalised), "recogniser_identity_cosine_mean": round(float(cosine.mean()), 4)}

    started = time.perf_counter()
    generator, history = train_normaliser(data, encoder, cfg.train, log, evaluate,
                                          evaluate_every=max(cfg.train.steps // 4, 1))
    wall = time.perf_counter() - started
    normalised = normalise_pixels(DeployedNormaliser(generator), original)
    report = identity_report(normalised, original, recogniser, evaluation)
    report_mobilefacenet = identity_report(normalised, original, mobilefacenet, evaluation)
    summary = {
        "architecture": "lefv_normaliser",
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "faces": {"train": len(items), "frontal_real": len(data.frontal),
                  "with_landmarks": int((~np.isnan(data.yaw)).sum()),
                  "frontal_max_abs_yaw": float(np.abs(data.yaw[data.frontal]).max())},
        "train_config": asdict(cfg.train),
        "history": history,
        "wall_time_s": round(wall, 1),
        "evaluation": {"recogniser": report, "mobilefacenet_identity_loss_network": report_mobilefacenet},
    }
    log(f"LFW ({recipe.name} recogniser): identity cosine {report['identity_cosine_mean']:.4f}, accuracy "
        f"{report['accuracy_without']:.4f} without, {report['accuracy_with']:.4f} with normalisation")
    save_weights(generator, output, {"architecture": "lefv_normaliser", "training": json.dumps(summary)})
    with atomic_path(output.with_suffix(".train.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
