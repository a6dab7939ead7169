"""MXNet file reading and the symbol-graph builder against hand-made files; MobileFace V2 as a teacher."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factory.errors import FactoryError
from factory.teachers import mobileface
from factory.teachers.mxnet import (
    NDARRAY_V1_MAGIC,
    OPS,
    load_symbol_graph,
    read_params,
    read_symbol,
    write_params,
)


def _symbol(nodes: list[dict], head: int) -> dict:
    arg_nodes = [i for i, node in enumerate(nodes) if node["op"] == "null"]
    return {"nodes": nodes, "arg_nodes": arg_nodes, "heads": [[head, 0, 0]], "attrs": {"mxnet_version": ["int", 10200]}}


class GraphWriter:
    """Builds a symbol JSON and its params op by op, as MXNet's Python API would save them."""

    def __init__(self) -> None:
        self.nodes: list[dict] = [{"op": "null", "name": "data", "inputs": []}]
        self.params: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(0)

    def _param(self, name: str, shape: tuple[int, ...], prefix: str = "arg", positive: bool = False) -> int:
        value = self.rng.standard_normal(shape).astype(np.float32) * 0.3
        self.params[f"{prefix}:{name}"] = np.abs(value) + 0.5 if positive else value
        self.nodes.append({"op": "null", "name": name, "inputs": []})
        return len(self.nodes) - 1

    def op(self, op: str, name: str, inputs: list[int], attrs: dict[str, str] | None = None) -> int:
        node = {"op": op, "name": name, "inputs": [[i, 0, 0] for i in inputs]}
        if attrs:
            node["attrs"] = attrs
        self.nodes.append(node)
        return len(self.nodes) - 1

    def conv(self, x: int, name: str, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             bias: bool = True) -> int:
        attrs = {"kernel": f"({kernel}, {kernel})", "num_filter": str(cout), "pad": f"({kernel // 2}, {kernel // 2})",
                 "stride": f"({stride}, {stride})", "num_group": str(groups), "no_bias": str(not bias)}
        weight = self._param(f"{name}_weight", (cout, cin // groups, kernel, kernel))
        inputs = [x, weight] + ([self._param(f"{name}_bias", (cout,))] if bias else [])
        return self.op("Convolution", name, inputs, attrs)

    def bn(self, x: int, name: str, channels: int, fix_gamma: bool = False) -> int:
        gamma = self._param(f"{name}_gamma", (channels,))
        beta = self._param(f"{name}_beta", (channels,))
        mean = self._param(f"{name}_moving_mean", (channels,), "aux")
        var = self._param(f"{name}_moving_var", (channels,), "aux", positive=True)
        return self.op("BatchNorm", name, [x, gamma, beta, mean, var],
                       {"fix_gamma": str(fix_gamma), "eps": "2e-05"})

    def fc(self, x: int, name: str, cin: int, cout: int) -> int:
        weight = self._param(f"{name}_weight", (cout, cin))
        bias = self._param(f"{name}_bias", (cout,))
        return self.op("FullyConnected", name, [x, weight, bias], {"num_hidden": str(cout)})

    def save(self, folder: Path, head: int) -> tuple[Path, Path]:
        symbol, params = folder / "net-symbol.json", folder / "net-0000.params"
        symbol.write_text(json.dumps(_symbol(self.nodes, head)))
        write_params(params, self.params)
        return symbol, params


def _every_op_graph(folder: Path) -> tuple[Path, Path, GraphWriter]:
    g = GraphWriter()
    x = g.op("_minus_scalar", "sub", [0], {"scalar": "127.5"})
    x = g.op("_mul_scalar", "mul", [x], {"scalar": "0.0078125"})
    x = g.op("_div_scalar", "div", [x], {"scalar": "2.0"})
    x = g.op("_plus_scalar", "plus", [x], {"scalar": "0.1"})
    x = g.conv(x, "conv1", 3, 8, 3, stride=2)
    x = g.bn(x, "bn1", 8)
    x = g.op("_maximum_scalar", "relu6_lo", [x], {"scalar": "0"})
    x = g.op("_minimum_scalar", "relu6_hi", [x], {"scalar": "6"})
    y = g.conv(x, "dw", 8, 8, 3, groups=8, bias=False)
    y = g.bn(y, "bn_dw", 8, fix_gamma=True)
    y = g.op("Activation", "act", [y], {"act_type": "relu"})
    x = g.op("elemwise_add", "add", [x, y])
    x = g.op("_Plus", "plus2", [x, y])
    x = g.op("Activation", "sig", [x], {"act_type": "sigmoid"})
    x = g.op("Activation", "tanh", [x], {"act_type": "tanh"})
    x = g.op("Pooling", "maxpool", [x], {"pool_type": "max", "kernel": "(2, 2)", "stride": "(2, 2)"})
    x = g.op("Pooling", "avgpool", [x], {"pool_type": "avg", "kernel": "(2, 2)", "stride": "(2, 2)"})
    x = g.op("Dropout", "drop", [x], {"p": "0.4"})
    x = g.op("Flatten", "flat", [x])
    x = g.fc(x, "fc", 8 * 4 * 4, 16)
    head = g.bn(x, "fc_bn", 16)
    symbol, params = g.save(folder, head)
    return symbol, params, g


def _reference(g: GraphWriter, x: torch.Tensor) -> torch.Tensor:
    """The same computation written directly with torch functions (eval-mode batch norm)."""
    p = {name.split(":", 1)[1]: torch.from_numpy(value) for name, value in g.params.items()}

    def bn(t: torch.Tensor, name: str, fix_gamma: bool = False) -> torch.Tensor:
        gamma = torch.ones_like(p[f"{name}_gamma"]) if fix_gamma else p[f"{name}_gamma"]
        shape = (1, -1) + (1,) * (t.ndim - 2)
        scale = (gamma / torch.sqrt(p[f"{name}_moving_var"] + 2e-5)).reshape(shape)
        return (t - p[f"{name}_moving_mean"].reshape(shape)) * scale + p[f"{name}_beta"].reshape(shape)

    x = ((x - 127.5) * 0.0078125) / 2.0 + 0.1
    x = F.conv2d(x, p["conv1_weight"], p["conv1_bias"], stride=2, padding=1)
    x = bn(x, "bn1").clamp(0, 6)
    y = F.relu(bn(F.conv2d(x, p["dw_weight"], None, padding=1, groups=8), "bn_dw", fix_gamma=True))
    x = torch.tanh(torch.sigmoid(x + y + y))
    x = F.avg_pool2d(F.max_pool2d(x, 2, 2), 2, 2)
    return bn(F.linear(x.flatten(1), p["fc_weight"], p["fc_bias"]), "fc_bn")


def test_params_round_trip_keeps_names_shapes_and_dtypes(tmp_path: Path) -> None:
    arrays = {"arg:w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "aux:m": np.array([1.5, -2.0], np.float64),
              "arg:h": np.array([[1, 2]], np.float16), "arg:i": np.array([7, -8], np.int32)}
    write_params(tmp_path / "a.params", arrays)
    loaded = read_params(tmp_path / "a.params")
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array)


def test_params_reads_the_v1_array_format(tmp_path: Path) -> None:
    value = np.array([[1.0, 2.0, 3.0]], np.float32)
    body = struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<II", NDARRAY_V1_MAGIC, 2) + struct.pack("<2q", 1, 3)
    body += struct.pack("<iii", 1, 0, 0) + value.tobytes() + struct.pack("<Q", 1) + struct.pack("<Q", 5) + b"arg:x"
    (tmp_path / "v1.params").write_bytes(body)
    assert np.array_equal(read_params(tmp_path / "v1.params")["arg:x"], value)


@pytest.mark.parametrize("damage", ["truncate", "header", "names"])
def test_corrupt_params_file_gives_one_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.params"
    write_params(path, {"arg:w": np.ones((4, 4), np.float32)})
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 30]
    elif damage == "header":
        data = b"\x00" * 8 + data[8:]
    else:
        data = data + b"trailing"
    path.write_bytes(data)
    with pytest.raises(FactoryError, match=r"c\.params"):
        read_params(path)


def test_graph_builder_matches_each_op_written_by_hand(tmp_path: Path) -> None:
    symbol, params, writer = _every_op_graph(tmp_path)
    nodes, _ = read_symbol(symbol)
    used = {node.op for node in nodes} - {"null"}
    assert used == set(OPS), f"the hand-made graph must use every supported op; missing {set(OPS) - used}"
    network = load_symbol_graph(symbol, params)
    x = torch.rand(3, 3, 32, 32) * 255
    with torch.no_grad():
        expected, got = _reference(writer, x), network(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_scalar_clamp_pairs_become_one_hardtanh_with_the_same_values(tmp_path: Path) -> None:
    g = GraphWriter()
    relu6 = g.op("_minimum_scalar", "hi", [g.op("_maximum_scalar", "lo", [0], {"scalar": "0"})], {"scalar": "6"})
    flipped = g.op("_maximum_scalar", "lo2", [g.op("_minimum_scalar", "hi2", [relu6], {"scalar": "4"})],
                   {"scalar": "1"})
    shared = g.op("_maximum_scalar", "lo3", [flipped], {"scalar": "2"})  # two consumers: stays a clamp of its own
    upper = g.op("_minimum_scalar", "hi3", [shared], {"scalar": "3"})
    constant = g.op("_minimum_scalar", "hi4", [g.op("_maximum_scalar", "lo4", [upper], {"scalar": "5"})],
                    {"scalar": "1"})  # low above high: a constant, not a clamp
    chain = g.op("_minimum_scalar", "c3", [g.op("_maximum_scalar", "c2", [g.op("_minimum_scalar", "c1", [constant],
                                                                            {"scalar": "7"})], {"scalar": "-1"})],
                 {"scalar": "0.5"})  # min, max, min: the first two become one clamp, the third stays
    head = g.op("elemwise_add", "add", [shared, chain])
    network = load_symbol_graph(*g.save(tmp_path, head))
    x = torch.randn(2, 3, 8, 8) * 8
    flipped_ref = x.clamp_min(0).clamp_max(6).clamp_max(4).clamp_min(1)
    shared_ref = flipped_ref.clamp_min(2)
    constant_ref = shared_ref.clamp_max(3).clamp_min(5).clamp_max(1)
    expected = shared_ref + constant_ref.clamp_max(7).clamp_min(-1).clamp_max(0.5)
    with torch.no_grad():
        torch.testing.assert_close(network(x), expected, rtol=0, atol=0)
    exported = torch.export.export(network, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("aten.hardtanh.default") == 3
    assert targets.count("aten.clamp_min.default") + targets.count("aten.clamp_max.default") == 5


def test_unsupported_op_and_mismatched_params_are_refused(tmp_path: Path) -> None:
    g = GraphWriter()
    head = g.op("LeakyReLU", "leaky", [0], {"act_type": "prelu"})
    symbol, params = g.save(tmp_path, head)
    with pytest.raises(FactoryError, match=r"'LeakyReLU'.*not supported"):
        load_symbol_graph(symbol, params)
    g = GraphWriter()
    head = g.conv(0, "conv", 3, 4, 3)
    symbol, params = g.save(tmp_path, head)
    write_params(params, {"arg:conv_weight": np.ones((4, 3, 3, 3), np.float32)})  # bias missing
    with pytest.raises(FactoryError, match="conv_bias"):
        load_symbol_graph(symbol, params)
    symbol.write_text("{not json")
    with pytest.raises(FactoryError, match="not an MXNet symbol JSON"):
        read_symbol(symbol)


def _fake_mobileface_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / mobileface.NAME
    folder.mkdir(parents=True)
    for remote in mobileface.FILES:
        (folder / remote.name).write_bytes(b"not the real file")
    return folder


def test_mobileface_files_with_a_wrong_sha256_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mobileface_folder(tmp_path)
    monkeypatch.setenv("FACTORY_MODELS", str(tmp_path / "models"))
    with pytest.raises(FactoryError, match=r"corrupt or not the pinned MobileFace V2 file.*teacher fetch"):
        mobileface.find_files()


def test_missing_mobileface_files_name_every_place_and_the_fetch(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTORY_MODELS", str(tmp_path / "nothing"))
    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mobileface, "SHARED_MODELS", tmp_path / "no-shared")
    with pytest.raises(FactoryError, match=r"not found.*nothing.*teacher fetch mobileface_v2"):
        mobileface.find_files()


def test_mobileface_fetch_verifies_sha256_against_a_local_server(tmp_path: Path, server,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = {remote.name: f"{remote.name} bytes".encode() for remote in mobileface.FILES}
    server.files.update(payloads)
    pinned = tuple(type(remote)(remote.name, remote.urls, sha256=hashlib.sha256(payloads[remote.name]).hexdigest())
                   for remote in mobileface.FILES)
    monkeypatch.setattr(mobileface, "FILES", pinned)
    folder = mobileface.fetch(tmp_path / "cache", mirror=server.url)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == payloads
    server.files[pinned[0].name] = b"tampered"
    (folder / pinned[0].name).unlink()
    with pytest.raises(FactoryError, match="checksum mismatch"):
        mobileface.fetch(tmp_path / "cache", mirror=server.url)


@pytest.mark.data
def test_mobileface_v2_verifies_real_lfw_pairs(faces_root: Path) -> None:
    """The converted MXNet graph on 600 fold-balanced LFW pairs (98.95% on all 6,000 through this path)."""
    if not all((mobileface.SHARED_MODELS / mobileface.NAME / r.name).is_file() for r in mobileface.FILES):
        pytest.fail(f"MobileFace V2 files not found under {mobileface.SHARED_MODELS}: this test needs "
                    "../shared/models next to the repository (or run `python -m factory teacher fetch mobileface_v2`)",
                    pytrace=False)
    from factory.benchmarks import read_pairs
    from factory.data import load_images, unique_pair_images
    from factory.evaluation import subsample_pairs
    from factory.metrics import k_fold_accuracy, pair_similarities
    from factory.teachers import load_teacher

    pairs = subsample_pairs(read_pairs(faces_root / "lfw" / "pairs.txt", faces_root / "lfw" / "aligned"), 600)
    paths = unique_pair_images(pairs)
    position = {path: i for i, path in enumerate(paths)}
    embeddings = load_teacher("mobileface_v2").embed(load_images(paths, 112))
    assert embeddings.shape == (len(paths), 256)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarities = pair_similarities(embeddings, np.array([position[p.path_a] for p in pairs]),
                                     np.array([position[p.path_b] for p in pairs]))
    accuracy = k_fold_accuracy(similarities, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))
    assert accuracy["accuracy"] >= 0.97, accuracy
