"""Training on a tiny synthetic set: resumable, deterministic, safetensors only."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import recipe_dict, synthetic_dataset

from factory.errors import FactoryError
from factory.models import create_model
from factory.recipe import load_recipe
from factory.train import train
from factory.weights import load_weights


class Interrupt(Exception):
    pass


def make_recipe(tmp_path: Path, epochs: int, weights: str):
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"), weights=weights)
    data["train"].update(epochs=epochs, batch_size=8, learning_rate=0.01)
    path = tmp_path / f"{weights}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    straight = make_recipe(tmp_path, epochs=2, weights="straight.safetensors")
    summary = train(straight, straight.resolve("straight.safetensors"), device="cpu", log=lambda _: None)
    assert len(summary["history"]) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])

    resumed = make_recipe(tmp_path, epochs=2, weights="resumed.safetensors")
    output = resumed.resolve("resumed.safetensors")

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(resumed, output, device="cpu", log=stop_after_first_epoch)
    assert not output.exists(), "no final weights before training finished"
    lines: list[str] = []
    train(resumed, output, device="cpu", log=lines.append)
    assert any(line.startswith("resumed from") for line in lines)

    a = load_weights(create_model("mobilefacenet"), straight.resolve("straight.safetensors"))
    b = load_weights(create_model("mobilefacenet"), output)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, epochs=1, weights="w.safetensors")
    output = recipe.resolve("w.safetensors")
    train(recipe, output, device="cpu", log=lambda _: None)
    recipe.train.learning_rate = 0.5
    with pytest.raises(FactoryError, match="other training settings"):
        train(recipe, output, device="cpu", log=lambda _: None)


def test_train_cli_writes_weights_log_and_evaluation(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from helpers import REPO

    recipe = make_recipe(tmp_path, epochs=1, weights="cli.safetensors")
    result = subprocess.run([sys.executable, "-m", "factory", "train", str(recipe.path), "--device", "cpu",
                             "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights written to" in result.stdout
    summary = json.loads(recipe.resolve("cli.train.json").read_text())
    assert summary["images"] == 24 and summary["identities"] == 4
    assert summary["evaluation"]["pairs"] == 12
    assert 0.0 <= summary["evaluation"]["lfw_accuracy"] <= 1.0
    load_weights(create_model("mobilefacenet"), recipe.resolve("cli.safetensors"))


def test_learning_curve_scores_every_epoch_of_each_identity_fraction(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from helpers import REPO

    recipe = make_recipe(tmp_path, epochs=1, weights="curve.safetensors")
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "factory", "curve", str(recipe.path), "--fractions", "0.5", "1",
                             "--epochs", "2", "--device", "cpu", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [(run["identities"], run["images"]) for run in curve["runs"]] == [(2, 12), (4, 24)]
    for run in curve["runs"]:
        assert [point["epoch"] for point in run["epochs"]] == [1, 2]
        assert all(0.0 <= point["accuracy"] <= 1.0 for point in run["epochs"])
        assert 0.0 <= run["final_accuracy"] <= 1.0
    assert (out / "learning_curve.png").stat().st_size > 10_000
    text = (out / "learning_curve.md").read_text()
    assert "| 2 (50%) | 12 |" in text and "| 4 | 2 |" in text
    assert not recipe.resolve("curve.safetensors").exists(), "the shipped weights are never touched"


def test_identity_fraction_is_validated(tmp_path: Path) -> None:
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"))
    data["train"]["identity_fraction"] = 0.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FactoryError, match=r"train\.identity_fraction: a fraction in \(0, 1\], got 0.0"):
        load_recipe(path)


class FixedEmbeddings(torch.nn.Module):
    """A 'model' returning preset embeddings for the images of a batch (indexed by their first pixel)."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embeddings[x[:, 0, 0, 0].long()]


def test_monitor_tells_a_collapsed_embedding_from_a_spread_one() -> None:
    from factory.losses import SoftmaxHead
    from factory.train import COLLAPSED_COSINE, ArcFaceHead, _monitor

    count = 200
    index = torch.arange(count, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(count, 3, 2, 2)
    labels = torch.arange(count) % 4
    spread = torch.eye(8)[labels]  # 4 orthogonal directions, one per identity
    noise = torch.randn(count, 8, generator=torch.manual_seed(0))
    cone = torch.nn.functional.normalize(torch.ones(count, 8) * 3 + noise)
    head = ArcFaceHead(8, 4, 64.0, 0.5)
    head.weight.data = torch.eye(8)[:4]
    healthy = _monitor(FixedEmbeddings(spread), head, index, labels)
    # Faces of the same identity share a direction (cosine 1), others are orthogonal: mean (n/4 - 1) / (n - 1).
    assert healthy["embedding_cosine_mean"] == pytest.approx((count / 4 - 1) / (count - 1), abs=1e-4)
    assert healthy["train_top1"] == 1.0
    collapsed = _monitor(FixedEmbeddings(cone), head, index, labels)
    assert collapsed["embedding_cosine_mean"] > 0.9 > COLLAPSED_COSINE
    assert collapsed["train_top1"] <= 0.5
    softmax = SoftmaxHead(8, 4)
    softmax.classifier.weight.data = torch.eye(8)[:4]
    softmax.classifier.bias.data.zero_()
    assert _monitor(FixedEmbeddings(spread), softmax, index, labels)["train_top1"] == 1.0
    # The triplet loss has no classifier: only the spread is measured.
    assert set(_monitor(FixedEmbeddings(spread), torch.nn.Identity(), index, labels)) == {"embedding_cosine_mean"}


def test_training_logs_the_monitor_every_epoch_and_warns_of_collapse(tmp_path: Path, monkeypatch) -> None:
    import factory.train

    torch.set_num_threads(1)
    # Any embedding counts as collapsed at a threshold of -1, so the warning path must run.
    monkeypatch.setattr(factory.train, "COLLAPSED_COSINE", -1.0)
    recipe = make_recipe(tmp_path, epochs=1, weights="w.safetensors")
    lines: list[str] = []
    summary = train(recipe, recipe.resolve("w.safetensors"), device="cpu", log=lines.append)
    monitor = summary["history"][0]["monitor"]
    assert set(monitor) == {"embedding_cosine_mean", "train_top1"}
    assert -1.0 <= monitor["embedding_cosine_mean"] <= 1.0 and 0.0 <= monitor["train_top1"] <= 1.0
    assert any(line.startswith("epoch 1/1") and f"embedding_cosine_mean {monitor['embedding_cosine_mean']}" in line
               for line in lines)
    written = json.loads(recipe.resolve("w.train.json").read_text())
    assert written["monitor"] == summary["monitor"] and written["collapsed"] is True
    assert any(line.startswith("WARNING: the embeddings collapsed") for line in lines)


def _recordio_recipe(tmp_path: Path, **train_settings):
    """The synthetic split converted to insightface RecordIO, and a recipe training from it (read while training)."""
    from factory.face_data import convert, open_source

    data = recipe_dict(synthetic_dataset(tmp_path / "faces"), weights="rec.safetensors")
    root = Path(data["data"]["root"])
    convert(open_source(root / "splits" / "train.txt", "list", root=root), "recordio", root / "rec" / "train.rec")
    data["train"].update(split="rec/train.rec", epochs=2, batch_size=8, learning_rate=0.01, loader_workers=0,
                         **train_settings)
    path = tmp_path / "rec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path), root / "rec" / "train.rec"


def test_training_reads_recordio_while_training_and_resumes_mid_epoch(tmp_path: Path, monkeypatch) -> None:
    import factory.train as training

    torch.set_num_threads(1)
    recipe, _ = _recordio_recipe(tmp_path, checkpoint_every=1)
    straight = train(recipe, tmp_path / "straight.safetensors", device="cpu", log=lambda _: None)
    assert straight["images"] == 24 and straight["identities"] == 4
    assert [record["loader"]["records"] for record in straight["history"]] == [24, 24]  # 3 steps x 8 faces
    assert all(record["loader"]["bad"] == {} and record["loader"]["images_per_s_per_worker"] > 0
               for record in straight["history"])

    saves = []
    original = training._save_checkpoint

    def save_then_stop(*args, **kwargs) -> None:
        original(*args, **kwargs)
        saves.append(args[-1])
        if args[-1]["epoch"] == 1 and args[-1]["batch"] == 2:  # two steps into the second epoch
            raise Interrupt

    monkeypatch.setattr(training, "_save_checkpoint", save_then_stop)
    output = tmp_path / "resumed.safetensors"
    with pytest.raises(Interrupt):
        train(recipe, output, device="cpu", log=lambda _: None)
    monkeypatch.setattr(training, "_save_checkpoint", original)
    lines: list[str] = []
    resumed = train(recipe, output, device="cpu", log=lines.append)
    assert any("after epoch 1 and 2 steps of the next" in line for line in lines), lines
    assert resumed["history"][-1]["loss"] == pytest.approx(straight["history"][-1]["loss"], rel=1e-5)
    a = load_weights(create_model("mobilefacenet"), tmp_path / "straight.safetensors")
    b = load_weights(create_model("mobilefacenet"), output)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name


def test_bad_records_are_skipped_and_counted_until_there_are_too_many(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe, rec = _recordio_recipe(tmp_path, max_bad_share=0.2)
    blob = bytearray(rec.read_bytes())
    offset = int(rec.with_suffix(".idx").read_text().splitlines()[3].split("\t")[1])  # the third image record
    blob[offset + 8 + 24 : offset + 8 + 40] = b"\0" * 16  # its JPEG header: undecodable
    rec.write_bytes(bytes(blob))
    summary = train(recipe, tmp_path / "w.safetensors", device="cpu", log=lambda _: None)
    bad = [record["loader"]["bad"] for record in summary["history"]]
    assert all(sum(counts.values()) <= 1 for counts in bad) and sum(sum(c.values()) for c in bad) >= 1, bad

    recipe.train.max_bad_share = 0.0
    with pytest.raises(FactoryError, match="too many bad face records"):
        train(recipe, tmp_path / "strict.safetensors", device="cpu", log=lambda _: None)
    assert not (tmp_path / "strict.safetensors").exists()


def test_streamed_data_refuses_what_needs_faces_in_memory(tmp_path: Path) -> None:
    recipe, _ = _recordio_recipe(tmp_path, loss="triplet")
    with pytest.raises(FactoryError, match="triplet batches"):
        train(recipe, tmp_path / "w.safetensors", device="cpu", log=lambda _: None)


def test_bf16_autocast_trains_and_fp16_asks_for_a_gpu(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe = make_recipe(tmp_path, epochs=2, weights="bf16.safetensors")
    recipe.train.precision = "bf16"
    summary = train(recipe, recipe.resolve("bf16.safetensors"), device="cpu", log=lambda _: None)
    losses = [record["loss"] for record in summary["history"]]
    assert all(math.isfinite(loss) for loss in losses) and summary["train_config"]["precision"] == "bf16"
    assert summary["history"][0]["images_per_s"] > 0
    recipe.train.precision = "fp16"
    with pytest.raises(FactoryError, match="fp16 needs a GPU"):
        train(recipe, tmp_path / "fp16.safetensors", device="cpu", log=lambda _: None)


@pytest.mark.slow
def test_torch_compile_trains_like_eager_and_checkpoints_the_plain_model(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    recipe = make_recipe(tmp_path, epochs=2, weights="eager.safetensors")
    eager = train(recipe, tmp_path / "eager.safetensors", device="cpu", log=lambda _: None)
    recipe.train.compile = True
    compiled = train(recipe, tmp_path / "compiled.safetensors", device="cpu", log=lambda _: None)
    assert compiled["train_config"]["compile"] is True and eager["train_config"]["compile"] is False
    losses = [record["loss"] for record in compiled["history"]]
    assert all(math.isfinite(loss) for loss in losses) and losses[1] < 0.6 * losses[0]
    # Inductor's kernels sum in another order; ArcFace (s=64) on 24 faces amplifies that within a few steps, so
    # the runs agree closely only at the start.
    assert losses[0] == pytest.approx(eager["history"][0]["loss"], rel=0.05)
    # What is saved is the plain module's state (no `_orig_mod.` prefixes): it loads into an uncompiled network.
    load_weights(create_model(recipe.model.architecture, **recipe.model.builder_kwargs()),
                 tmp_path / "compiled.safetensors")

    # One training step of the compiled network against eager, from the same weights on the same batch: the
    # gradients agree to within float noise (batch norm's backward over 8 images amplifies the reordered sums to
    # about 1e-3 of the gradient's norm; a wrong or missing gradient would be of its order).
    torch.manual_seed(0)
    model = create_model(recipe.model.architecture, **recipe.model.builder_kwargs()).train()
    twin = create_model(recipe.model.architecture, **recipe.model.builder_kwargs()).train()
    twin.load_state_dict(model.state_dict())
    images, projection = torch.randn(8, 3, 112, 112), torch.randn(recipe.model.embedding_size, 4)
    (model(images) @ projection).square().mean().backward()
    (torch.compile(twin)(images) @ projection).square().mean().backward()
    plain = torch.cat([p.grad.flatten() for p in model.parameters()])
    fused = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert (plain - fused).norm() < 1e-2 * plain.norm()


def test_micro_batches_change_only_batch_norms_statistics(tmp_path: Path) -> None:
    from factory.recipe import TrainConfig
    from factory.train import _make_head, _Objective

    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = make_recipe(tmp_path, epochs=2, weights="chunked.safetensors")
    model = create_model(recipe.model.architecture, **recipe.model.builder_kwargs())
    head = _make_head(recipe.train, recipe.model.embedding_size, num_classes=5)
    images, labels = torch.randn(10, 3, 112, 112), torch.arange(10) % 5

    def step(micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = TrainConfig(**{**recipe.train.__dict__, "micro_batch": micro_batch})
        model.zero_grad(set_to_none=True)
        loss = _Objective(model, head, None, cfg)(images, labels, len(labels), 1, None)["total"]
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    # With batch norm on its running statistics the chunks (10 faces as 4 + 3 + 3) are the same computation as
    # one batch: the loss and every gradient agree to float rounding.
    model.eval()
    whole_loss, whole_grad = step(0)
    chunked_loss, chunked_grad = step(4)
    assert chunked_loss == pytest.approx(whole_loss.item(), rel=1e-5)
    assert (chunked_grad - whole_grad).norm() < 1e-4 * whole_grad.norm()

    # Training mode: each chunk is normalised by its own statistics, so its embeddings are those of the chunk run
    # alone, and differ from the whole batch's.
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(**{**recipe.train.__dict__, "micro_batch": 5})
    captured = []
    _Objective(model, head, None, cfg, forward_model=lambda x: captured.append(model(x)) or captured[-1])(
        images, labels, len(labels), 1, None)
    model.load_state_dict(state)
    with torch.no_grad():
        alone = model(images[:5])
        whole = model(images)
    assert len(captured) == 2 and torch.allclose(captured[0].detach(), alone, atol=1e-5)
    assert not torch.allclose(captured[0].detach(), whole[:5], atol=1e-3)

    # A whole training run with chunks trains, and records the setting.
    recipe.train.micro_batch = 3
    summary = train(recipe, recipe.resolve("chunked.safetensors"), device="cpu", log=lambda _: None)
    losses = [record["loss"] for record in summary["history"]]
    assert summary["train_config"]["micro_batch"] == 3 and losses[1] < losses[0]


def test_micro_batch_of_one_face_is_refused(tmp_path: Path) -> None:
    data = recipe_dict(synthetic_dataset(tmp_path / "faces"), weights="w.safetensors")
    data["train"]["micro_batch"] = 1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FactoryError, match=r"train\.micro_batch: 0 .* at least 2 faces, got 1"):
        load_recipe(path)
