"""The onnxruntime engine runs the same exact overlap-tile inference: its tiled logits equal
torch's (and the whole-volume forward pass) to 1e-4 of their range, labels included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ModelError
from medseg.inference.engine import OnnxRuntimeNetwork, with_engine
from medseg.inference.model_folder import load_model
from medseg.inference.tiled import predict_logits
from medseg.io import read_volume, write_volume
from medseg.model.export import export_onnx
from medseg.volume import Grid, Volume
from tests.inference.helpers import (
    make_plan,
    model_folder,
    random_unet,
    run_cli,
    whole_volume_logits,
)


@pytest.mark.parametrize("dims", [2, 3])
def test_onnxruntime_tiles_equal_torch_and_the_whole_volume(tmp_path: Path, dims: int) -> None:
    net = random_unet(dims, cin=1, cout=3, depth=2, base=4, seed=dims)
    path = export_onnx(net, tmp_path / "m.onnx")
    ort_net = OnnxRuntimeNetwork(path, net.network)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 30, 26, 22)[: dims + 1]).astype(np.float32)
    ref = predict_logits(net, image, tile_size=12)
    got = predict_logits(ort_net, image, tile_size=12)
    whole = whole_volume_logits(net, image, [()])
    span = float(whole.max() - whole.min())
    assert np.max(np.abs(got - ref)) <= 1e-4 * span
    assert np.max(np.abs(got - whole)) <= 1e-4 * span
    top2 = np.sort(whole, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3 * span  # labels of near-ties may flip by rounding
    assert np.array_equal(got.argmax(0)[clear], whole.argmax(0)[clear])


def test_a_model_folder_runs_with_its_onnx_file(tmp_path: Path) -> None:
    plan = make_plan(dims=3, label_values=(0, 1, 2))
    folder, net = model_folder(tmp_path, plan)
    export_onnx(net, folder / "model.onnx")
    loaded = with_engine(load_model(folder), "onnxruntime")
    assert isinstance(loaded.model, OnnxRuntimeNetwork) and loaded.plan is not None


def test_a_graph_of_another_network_or_no_graph_is_refused(tmp_path: Path) -> None:
    plan = make_plan(dims=3, label_values=(0, 1, 2))
    folder, _ = model_folder(tmp_path, plan)
    loaded = load_model(folder)
    with pytest.raises(ModelError, match="medseg export --onnx"):
        with_engine(loaded, "onnxruntime")
    other = random_unet(3, cin=1, cout=3, depth=2, base=8)
    export_onnx(other, folder / "model.onnx")
    with pytest.raises(ModelError, match="base_channels differ"):
        with_engine(loaded, "onnxruntime")
    with pytest.raises(ModelError, match="expected one of torch, onnxruntime"):
        with_engine(loaded, "tensorrt")


def test_cli_export_then_infer_with_onnxruntime_gives_the_torch_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = make_plan(dims=3, label_values=(0, 1, 2))
    folder, _ = model_folder(tmp_path, plan)
    code, out, err = run_cli(["export", "--model", str(folder)], capsys)
    assert code == 0, err
    assert out.startswith(f"wrote {folder / 'model.onnx'}: onnxruntime logits within")
    assert float(out.split("within ")[1].split()[0]) <= 1e-4
    assert run_cli(["export", "--model", str(folder)], capsys)[0] == 2  # exists: refused
    other = tmp_path / "other.onnx"
    assert run_cli(["export", "--model", str(folder), "--onnx", str(other)], capsys)[0] == 0
    rng = np.random.default_rng(1)
    scan = tmp_path / "scan.nii.gz"
    write_volume(Volume(rng.normal(size=(1, 30, 26, 22)).astype(np.float32), Grid.from_spacing(
        (30, 26, 22), (0.8, 0.9, 2.0))), scan)  # fmt: skip
    base = ["infer", "--volume", str(scan), "--model", str(folder), "--tile-size", "12"]
    assert run_cli([*base, "--output", str(tmp_path / "t.nii.gz")], capsys)[0] == 0
    code, _, err = run_cli(
        [*base, "--output", str(tmp_path / "o.nii.gz"), "--engine", "onnxruntime"], capsys
    )
    assert code == 0, err
    extra = ["--engine", "onnxruntime", "--onnx", str(other)]
    assert run_cli([*base, "--output", str(tmp_path / "p.nii.gz"), *extra], capsys)[0] == 0
    torch_labels = read_volume(tmp_path / "t.nii.gz").array
    for name in ("o.nii.gz", "p.nii.gz"):
        ort_labels = read_volume(tmp_path / name).array
        assert np.mean(torch_labels == ort_labels) >= 0.999  # only near-ties may differ
