"""Model folders: weights and plan restored, pickled code refused, mismatches named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import ModelError, PlanError
from medseg.inference.model_folder import load_model
from tests.inference.helpers import Evil, make_plan, model_folder, run_cli


def test_load_model_restores_weights_and_plan(tmp_path: Path, rng: np.random.Generator) -> None:
    plan = make_plan(depth=1, base=2, label_values=(0, 3, 7))
    folder, net = model_folder(tmp_path, plan)
    loaded = load_model(folder)
    assert loaded.plan.label_values == [0, 3, 7] and loaded.postprocessing is None
    assert not loaded.model.training
    x = torch.from_numpy(rng.normal(size=(1, 1, 20, 20, 20)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net(x))


def test_load_model_refuses_pickled_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, net = model_folder(tmp_path, make_plan(depth=1))
    state = dict(net.state_dict())
    state["payload"] = Evil()  # type: ignore[assignment]
    torch.save(state, folder / "model.pt")
    with pytest.raises(ModelError, match="refused"):
        load_model(folder)
    assert "EXECUTED" not in capsys.readouterr().out


def test_load_model_names_mismatched_weights(tmp_path: Path) -> None:
    folder, net = model_folder(tmp_path, make_plan(depth=1))
    state = net.state_dict()
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "model.pt")
    with pytest.raises(ModelError, match=r"missing \['head.weight'\].*unexpected"):
        load_model(folder)


def test_load_model_without_plan_is_plan_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(PlanError, match="plan.json"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize(
    ("summary", "warned"),
    [
        ({"stopped_by": "time budget", "steps_done": 10, "steps_planned": 100}, True),
        ({"stopped_by": "steps", "steps_done": 100, "steps_planned": 100}, False),
        (None, False),
    ],
)
def test_cli_infer_warns_when_the_model_stopped_short_of_its_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], summary: dict | None, warned: bool
) -> None:
    import json

    from medseg.io import write_volume
    from medseg.volume import Grid, Volume

    folder, _ = model_folder(tmp_path, make_plan(depth=1, base=2))
    if summary is not None:
        (folder / "train_summary.json").write_text(json.dumps(summary))
    scan = tmp_path / "scan.nii.gz"
    write_volume(Volume(np.zeros((1, 12, 12, 12), np.float32), Grid((12, 12, 12), np.eye(4))), scan)
    args = ["infer", "--volume", str(scan), "--model", str(folder), "--output",
            str(tmp_path / "pred.nii.gz"), "--device", "cpu"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert ("stopped by the time budget at step 10 of 100" in err) is warned
