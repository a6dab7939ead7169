import pytest
import torch

from factory.models import create_model, model_entry, model_names
from factory.profile import count_macs, count_parameters


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_embeds_a_batch(name: str) -> None:
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", model_names())
def test_params_and_macs_match_the_paper_within_2_percent(name: str) -> None:
    paper = model_entry(name).paper_numbers
    model = create_model(name)
    params_m = count_parameters(model) / 1e6
    macs_m = count_macs(model, (1, 3, 112, 112)) / 1e6
    assert params_m == pytest.approx(paper["params_m"], rel=0.02)
    assert macs_m == pytest.approx(paper["macs_m"], rel=0.02)


def test_mobilefacenet_follows_table_1() -> None:
    model = create_model("mobilefacenet")
    bottlenecks = [m for m in model.features if m.__class__.__name__ == "Bottleneck"]
    assert len(bottlenecks) == 5 + 1 + 6 + 1 + 2
    assert sum(isinstance(m, torch.nn.PReLU) for m in model.modules()) > 0
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    gdc = model.gdc[0]
    assert gdc.kernel_size == (7, 7) and gdc.groups == 512


def test_unknown_architecture_names_the_registered_ones() -> None:
    from factory.errors import FactoryError

    with pytest.raises(FactoryError, match="mobilefacenet"):
        create_model("resnet-9000")
