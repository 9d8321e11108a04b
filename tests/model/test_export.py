"""ONNX export: the graph onnxruntime reads has free batch and spatial sizes, and its logits
are those of the torch network at tile sizes other than the example it was traced with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medseg.errors import ModelError
from medseg.model import shapes
from medseg.model.export import export_onnx, onnx_network
from tests.inference.helpers import random_unet


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    net = random_unet(3, cin=2, cout=3, depth=2, base=4, seed=1)
    return export_onnx(net, tmp_path_factory.mktemp("onnx") / "m.onnx"), net


def test_batch_and_spatial_axes_are_free(exported: tuple[Path, torch.nn.Module]) -> None:
    path, _ = exported
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True, True]
    assert dims[1].dim_value == 2


@pytest.mark.parametrize("size", [(12, 20, 28), (36, 12, 4)])
def test_logits_equal_torch_at_any_valid_tile_size(
    exported: tuple[Path, torch.nn.Module], size: tuple[int, int, int]
) -> None:
    path, net = exported
    m = shapes.margin(2)
    x = torch.randn(3, 2, *(s + 2 * m for s in size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert got.shape == ref.shape == (3, 3, *size)
    assert np.max(np.abs(got - ref)) <= 1e-4 * (ref.max() - ref.min())


def test_the_network_settings_travel_in_the_file(exported: tuple[Path, torch.nn.Module]) -> None:
    path, net = exported
    assert onnx_network(path) == net.network


def test_a_file_without_medseg_metadata_is_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(bare))
    with pytest.raises(ModelError, match="no medseg network metadata"):
        onnx_network(bare)
    with pytest.raises(ModelError, match="not found"):
        onnx_network(tmp_path / "missing.onnx")
