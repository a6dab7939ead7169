"""The pruned CoreMLQuantizer annotates exactly as ExecuTorch's own, from a fraction of its pattern exports."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from factory.targets import coreml_patterns


class ManyPatterns(nn.Module):
    """Convolutions with and without batch norm before ReLU (in place and not), PReLU, hardswish and none; a
    residual add with and without ReLU; a multiply; a 1-D convolution; a linear layer with batch norm and one
    with an activation. Enough that pruning could drop a pattern the network does contain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.PReLU(8))
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.gate = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardswish())
        self.line = nn.Conv1d(8, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(4 * 64, 16), nn.BatchNorm1d(16))
        self.tail = nn.Sequential(nn.Linear(16, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.project(x) + x
        x = x * self.gate(x)
        x = self.line(x.flatten(2))  # (N, 8, 64): the 8x8 map as a sequence
        return self.tail(self.head(x.flatten(1)))


def _config() -> object:
    import coremltools.optimize.torch.quantization as ctq

    # The factory's Core ML int8 setting (factory/targets/coreml.py).
    return ctq.LinearQuantizerConfig(global_config=ctq.ModuleLinearQuantizerConfig(
        quantization_scheme="affine", activation_dtype=torch.quint8, weight_dtype=torch.qint8,
        weight_per_channel=True, activation_observer="min_max"))


def _prepared(quantizer: object, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[tuple[str, ...]], int, float]:
    """What prepare_pt2e makes of ManyPatterns: the graph code, every observer, pattern exports and seconds."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    helpers = coreml_patterns._helpers()
    assert helpers is not None, "ExecuTorch's CoreMLQuantizer helpers changed; coreml_patterns no longer prunes"
    utils, _ = helpers
    exports = []
    export = utils._get_aten_graph_module
    monkeypatch.setattr(utils, "_get_aten_graph_module", lambda *args, **kw: exports.append(1) or export(*args, **kw))
    torch.manual_seed(0)
    model = ManyPatterns().eval()
    graph = torch.export.export(model, (torch.randn(2, 3, 8, 8),)).module()
    start = time.perf_counter()
    prepared = prepare_pt2e(graph, quantizer)
    seconds = time.perf_counter() - start
    observers = sorted((name, type(module).__name__, str(getattr(module, "dtype", "")),
                        str(getattr(module, "qscheme", ""))) for name, module in prepared.named_modules())
    return prepared.code, observers, len(exports), seconds


@pytest.mark.slow  # the unpruned quantiser's 405 pattern exports: about a minute
def test_pruned_quantizer_annotates_like_the_full_one_from_far_fewer_exports(monkeypatch) -> None:
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    coreml_patterns._part_ops.cache_clear()  # count the part probes too
    code, observers, exports, seconds = _prepared(coreml_patterns.pruned_coreml_quantizer(_config()), monkeypatch)
    full_code, full_observers, full_exports, full_seconds = _prepared(CoreMLQuantizer(_config()), monkeypatch)

    assert full_exports == 405, "the full quantiser exports every pattern it knows"
    assert exports < 0.2 * full_exports, (exports, full_exports)
    assert code == full_code
    assert observers == full_observers
    # Observers really were placed, on the ops the network has: an empty annotation would also "match".
    assert sum("activation_post_process" in name for name, *_ in observers) >= 12, observers
    print(f"pruned: {exports} exports, {seconds:.1f} s; full: {full_exports} exports, {full_seconds:.1f} s")


def test_pruning_restores_the_quantiser_helpers(monkeypatch) -> None:
    utils, originals = coreml_patterns._helpers()
    _prepared(coreml_patterns.pruned_coreml_quantizer(_config()), monkeypatch)
    for name, original in originals.items():
        assert getattr(utils, name) is original, name
