"""Recipe-selectable int8 activation observers (factory/observers.py), on synthetic data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyFaceNet, settle_batchnorm
from test_targets import MEAN, STD, pixels

from factory.observers import DESCRIPTIONS, use_activation_observer
from factory.targets import CompileRequest


class Concat(torch.nn.Module):
    """Two branches concatenated (shared quantisation parameters), as in SeesawFaceNet's blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.a(x), self.b(x)), dim=1).flatten(1)


def xnnpack_prepared(model: torch.nn.Module) -> torch.fx.GraphModule:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return prepare_pt2e(torch.export.export(model.eval(), (torch.randn(1, 3, 8, 8),)).module(), quantizer)


def observers(prepared: torch.fx.GraphModule) -> dict[str, torch.nn.Module]:
    modules = {n.target: prepared.get_submodule(n.target) for n in prepared.graph.nodes if n.op == "call_module"}
    return {name: module for name, module in modules.items() if hasattr(module, "qscheme")}


def test_mean_min_max_is_the_order_free_mean_of_each_faces_extremes() -> None:
    torch.manual_seed(0)
    model = Concat()
    prepared = xnnpack_prepared(model)
    assert use_activation_observer(prepared, "mean_min_max") >= 2
    faces = [torch.randn(1, 3, 8, 8) * (1 + i) for i in range(5)]
    with torch.no_grad():
        for face in faces:
            prepared(face)
    # The network's input observer saw exactly the faces: its range is the mean of their own min and max.
    placeholder = next(n for n in prepared.graph.nodes if n.op == "placeholder")
    first = next(observers(prepared)[u.target] for u in placeholder.users if u.target in observers(prepared))
    assert type(first).__name__ == "MeanMinMaxObserver"
    expected_min = float(np.mean([float(f.min()) for f in faces]))
    expected_max = float(np.mean([float(f.max()) for f in faces]))
    assert float(first.min_val) == pytest.approx(expected_min, rel=1e-5)
    assert float(first.max_val) == pytest.approx(expected_max, rel=1e-5)
    reordered = xnnpack_prepared(model)
    use_activation_observer(reordered, "mean_min_max")
    with torch.no_grad():
        for face in faces[::-1]:
            reordered(face)
    for name, module in observers(reordered).items():
        if module.min_val.numel() == 1:
            assert float(module.min_val) == pytest.approx(float(observers(prepared)[name].min_val), rel=1e-5)


def test_weights_keep_their_per_channel_observers_and_shared_ranges_stay_shared() -> None:
    prepared = xnnpack_prepared(Concat())
    before = observers(prepared)
    weight_observers = {name for name, m in before.items() if m.qscheme == torch.per_channel_symmetric}
    assert weight_observers, "the quantiser observes each conv weight per channel"
    use_activation_observer(prepared, "min_max")
    after = observers(prepared)
    for name, module in after.items():
        if name in weight_observers:
            assert module is before[name]
        else:
            assert type(module).__name__ == "MinMaxObserver", name
    # The concatenation's inputs and output share one observer: still one instance after the swap.
    cat = next(n for n in prepared.graph.nodes if n.target == torch.ops.aten.cat.default)
    shared = {id(prepared.get_submodule(n.target)) for n in cat.args[0]}
    shared |= {id(prepared.get_submodule(u.target)) for u in cat.users if u.op == "call_module"}
    assert len(shared) == 1


def test_default_changes_nothing_and_unknown_kinds_are_refused() -> None:
    prepared = xnnpack_prepared(Concat())
    before = observers(prepared)
    assert use_activation_observer(prepared, "default") == 0
    assert all(observers(prepared)[name] is module for name, module in before.items())
    with pytest.raises(ValueError, match="unknown activation observer 'percentile'"):
        use_activation_observer(prepared, "percentile")


def test_an_outlier_face_costs_the_typical_faces_less_with_mean_min_max() -> None:
    """One calibration face with 20x the usual contrast sets min/max ranges; the mean dilutes it."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    backbone = settle_batchnorm(TinyFaceNet(), torch.randn(32, 3, 112, 112))
    calibration = pixels(40, 0)
    calibration[7] = np.clip((calibration[7] - 127.5) * 20 + 127.5, -3000, 3000)
    typical = torch.from_numpy((pixels(16, 1) - 127.5) / 128.0)
    with torch.no_grad():
        reference = torch.nn.functional.normalize(backbone(typical))
    cosines = {}
    for kind in ("min_max", "mean_min_max"):
        request = CompileRequest(backbone, MEAN, STD, 32, "int8", calibration, Path("x"),
                                 observer=kind)
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        quantised = request.quantized_backbone(quantizer, fold_quantize=False)
        with torch.no_grad():
            out = torch.nn.functional.normalize(torch.cat([quantised(typical[i : i + 1]) for i in range(16)]))
        cosines[kind] = float((out * reference).sum(1).mean())
    assert cosines["mean_min_max"] >= 0.99, cosines
    assert cosines["mean_min_max"] > cosines["min_max"] + 0.005, cosines


def test_the_artifact_description_names_a_chosen_observer() -> None:
    def request(precision: str, observer: str) -> CompileRequest:
        return CompileRequest(torch.nn.Identity(), MEAN, STD, 32, precision, np.zeros((1, 3, 2, 2)),
                              Path("x"), observer=observer)

    assert request("int8", "mean_min_max").describe_quantization("W8A8") == f"W8A8; {DESCRIPTIONS['mean_min_max']}"
    assert request("int8", "default").describe_quantization("W8A8") == "W8A8"
    assert request("fp32", "mean_min_max").describe_quantization("none") == "none"
