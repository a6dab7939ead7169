import inspect
import json

import pytest
import torch

from factory.models import create_model, model_entry, model_names
from factory.profile import count_macs, count_parameters

# Registered models whose publications give no parameter or MAC figures this project could quote; each says
# so in its module docstring and pins its computed figures in a test of its own below.
WITHOUT_PAPER_FIGURES = {"lefv", "mobileface_v2"}
WITH_PAPER_FIGURES = [name for name in model_names() if name not in WITHOUT_PAPER_FIGURES]


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_embeds_a_batch(name: str) -> None:
    # 128-D for the architectures trained here; an imported one's weights fix its own width (its builder default).
    width = inspect.signature(model_entry(name).builder).parameters["embedding_size"].default
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, width)
    assert width == 128 or model_entry(name).imported is not None
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_exports_with_torch_export(name: str) -> None:
    model = create_model(name).eval()
    example = torch.randn(1, 3, 112, 112)
    exported = torch.export.export(model, (example,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(example), model(example), rtol=1e-4, atol=1e-4)


def test_models_without_paper_figures_are_exactly_the_listed_ones() -> None:
    missing = {name for name in model_names() if "params_m" not in model_entry(name).paper_numbers}
    assert missing == WITHOUT_PAPER_FIGURES


@pytest.mark.parametrize("name", WITH_PAPER_FIGURES)
def test_params_and_macs_match_the_paper(name: str) -> None:
    entry = model_entry(name)
    model = create_model(name, **entry.paper_kwargs)
    side = int(entry.paper_kwargs.get("input_size", 112))
    params_m = count_parameters(model) / 1e6
    macs_m = count_macs(model, (1, 3, side, side)) / 1e6
    assert params_m == pytest.approx(entry.paper_numbers["params_m"], rel=entry.tolerance_of("params_m"))
    assert macs_m == pytest.approx(entry.paper_numbers["macs_m"], rel=entry.tolerance_of("macs_m"))


def test_tolerances_stay_tight() -> None:
    assert model_entry("mobilefacenet").tolerance_of("params_m") == 0.02
    assert model_entry("mobilefacenet").tolerance_of("macs_m") == 0.02
    for name in WITH_PAPER_FIGURES:
        assert model_entry(name).tolerance_of("macs_m") <= 0.03, name


def test_mobilefacenet_follows_table_1() -> None:
    model = create_model("mobilefacenet")
    bottlenecks = [m for m in model.features if m.__class__.__name__ == "Bottleneck"]
    assert len(bottlenecks) == 5 + 1 + 6 + 1 + 2
    assert sum(isinstance(m, torch.nn.PReLU) for m in model.modules()) > 0
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    gdc = model.gdc[0]
    assert gdc.kernel_size == (7, 7) and gdc.groups == 512


@pytest.mark.parametrize(
    ("name", "blocks", "hidden"),
    [("seesawfacenet_shuffle", 15, 128), ("seesawfacenet_share", 15, 128),
     ("seesawfacenet_dw_v1", 27, 192), ("seesawfacenet_dw_v2", 27, 192)],
)
def test_seesawfacenet_follows_the_authors_layer_settings(name: str, blocks: int, hidden: int) -> None:
    from factory.models.seesawfacenet import SeesawBlock

    model = create_model(name)
    seesaw = [m for m in model.features if isinstance(m, SeesawBlock)]
    assert len(seesaw) == blocks
    first = seesaw[0]
    # The uneven split: a quarter of the input and of the hidden width on the small path.
    assert first.expand_small[0].in_channels * 4 == first.expand_large[0].in_channels + first.in_small
    assert first.depthwise[0].groups == hidden and first.depthwise[0].stride == (2, 2)
    assert any(isinstance(m, torch.nn.Hardswish) for m in model.modules())
    assert model.gdc[0].kernel_size == (7, 7)


def test_seesaw_shuffle_interleaves_the_two_halves() -> None:
    from factory.models.seesawfacenet import channel_shuffle

    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_seesaw_dw_variants_differ_only_in_the_downsampling_shortcut() -> None:
    v1, v2 = create_model("seesawfacenet_dw_v1"), create_model("seesawfacenet_dw_v2")
    assert count_parameters(v1) == count_parameters(v2)
    assert isinstance(v2.features[2].downsample[0], torch.nn.MaxPool2d)
    assert v1.features[2].downsample[0].stride == (2, 2)
    assert create_model("seesawfacenet_shuffle").features[2].downsample is None


@pytest.mark.parametrize(("name", "width"), [("fastfacenet_0_25", 0.25), ("fastfacenet_0_5", 0.5),
                                              ("fastfacenet_0_75", 0.75), ("fastfacenet_1_0", 1.0)])
def test_fastfacenet_is_mobilenet_v1_at_each_width(name: str, width: float) -> None:
    model = create_model(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 13
    assert convs[-1].out_channels == int(1024 * width)
    assert sum(isinstance(m, torch.nn.ReLU6) for m in model.modules()) == len(convs)


@pytest.mark.parametrize(
    ("name", "params_m", "macs_m"),
    # Computed at 112x112 and 128-D (mobileface_v2: 256-D, fixed by its weights; module docstrings); pinned so a
    # change to the layers is noticed.
    [("fastfacenet_0_25", 0.246, 10.61), ("fastfacenet_0_5", 0.884, 38.81), ("fastfacenet_0_75", 1.915, 84.61),
     ("fastfacenet_1_0", 3.338, 148.0), ("lefv", 1.759, 184.4), ("mobileface_v2", 0.882, 40.67)],
)
def test_computed_figures_of_the_factory_build(name: str, params_m: float, macs_m: float) -> None:
    model = create_model(name)
    assert count_parameters(model) / 1e6 == pytest.approx(params_m, rel=0.005)
    assert count_macs(model, (1, 3, 112, 112)) / 1e6 == pytest.approx(macs_m, rel=0.005)


def test_lefv_fuses_four_scales_into_960_channels() -> None:
    model = create_model("lefv").eval()
    assert [block[0][0].out_channels for block in model.blocks] == [32, 64, 128, 256]
    assert model.fuse[0].in_channels == 32 + 64 + 128 + 256 and model.fuse[0].out_channels == 960
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_imported_model_states_its_source_and_keeps_the_sizes_its_weights_fix() -> None:
    from factory.errors import FactoryError
    from factory.teachers import mobileface

    imported = model_entry("mobileface_v2").imported
    assert imported is not None and imported.licence == "MIT"
    assert mobileface.COMMIT in imported.source and "may share identities with LFW" in imported.training_data
    assert [path.name for path in imported.files()] == [remote.name for remote in mobileface.FILES]
    assert all(model_entry(name).imported is None for name in model_names() if name != "mobileface_v2")
    with pytest.raises(FactoryError, match="embedding_size: 256"):
        create_model("mobileface_v2", embedding_size=128)


def test_imported_weights_are_described_by_their_source_files_in_the_model_card() -> None:
    from helpers import REPO

    from factory.models import weights_provenance
    from factory.recipe import load_recipe
    from factory.report import render_weights_lines
    from factory.report_schema import ModelInfo, from_data
    from factory.teachers import mobileface

    model = weights_provenance(load_recipe(REPO / "recipes" / "mobileface_v2.yaml"))
    assert model["weights_sha256"] is None and model["training"] is None
    assert model["imported"]["files"] == {remote.name: remote.sha256 for remote in mobileface.FILES}
    built = json.loads((REPO / "reports" / "mobileface_v2" / "report.json").read_text())["model"]
    card = "\n".join(render_weights_lines(from_data(ModelInfo, {**built, **model})))
    assert mobileface.COMMIT in card and "MIT licence" in card and "may share identities with LFW" in card


def test_unknown_architecture_names_the_registered_ones() -> None:
    from factory.errors import FactoryError

    with pytest.raises(FactoryError, match="mobilefacenet"):
        create_model("resnet-9000")
