"""Pipeline TOML checks: a cache planned without the pipeline's ``[plan]`` is refused.

The reference plans come from ``make_plan`` itself (what ``medseg preprocess`` writes with and
without ``--pipeline``), so the check is tested against the real way overrides are applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.config import check_plan_overrides, dicom_codes, load_pipeline
from medseg.errors import PlanError
from medseg.preprocess.fingerprint import CaseFingerprint, ChannelStats, Fingerprint
from medseg.preprocess.plan import make_plan
from medseg.volume import Box, Grid

#: Every kind of override: plain fields, merged network/channels, orientation, bool, spacing.
_PLAN_TOML = """\
[plan]
spatial_dims = 3
target_spacing = [1.5, 1.5, 3.0]
orientation = "none"
crop_to_nonzero = false
label_values = [0, 2, 1]
class_names = ["bg", "b", "a"]
network = { depth = 2, base_channels = 8, dropout = 0.5 }
channels = [{ normalisation = "zscore" }, { normalisation = "none" }]
patch_output_size = [28, 28, 12]
"""


@pytest.fixture
def fingerprint() -> Fingerprint:
    """Two MR channels, classes 0/1/2, four 64x64x32 cases at 1 x 1 x 2.5 mm (no pixels)."""
    grid = Grid((64, 64, 32), np.diag([1.0, 1.0, 2.5, 1.0]))
    cases = [
        CaseFingerprint(f"c{i}", grid, 2, Box((0, 0, 0), (64, 64, 32)), {0: 9, 1: 5, 2: 3})
        for i in range(4)
    ]
    stats = [ChannelStats(n, 0.0, 1.0, -3.0, 3.0, -4.0, 4.0, 100) for n in ("T1", "T2")]
    labels = {0: "background", 1: "a", 2: "b"}
    return Fingerprint("fp", ["T1", "T2"], ["MR", "MR"], labels, None, cases, stats)


def _pipeline(tmp_path: Path, prep: Path, plan_toml: str = _PLAN_TOML):
    toml = tmp_path / "p.toml"
    toml.write_text(f'name = "p"\nmanifest = "m.json"\nprep_dir = "{prep}"\n{plan_toml}')
    return load_pipeline(toml)


def _prep(tmp_path: Path, fp: Fingerprint, overrides: dict | None) -> Path:
    prep = tmp_path / "prep"
    prep.mkdir()
    make_plan(fp, overrides).save(prep / "plan.json")
    return prep


def test_cache_preprocessed_with_the_pipeline_passes(tmp_path: Path, fingerprint) -> None:
    pipe = _pipeline(tmp_path, tmp_path / "prep")
    prep = _prep(tmp_path, fingerprint, pipe.plan)
    check_plan_overrides(pipe, prep)


def test_cache_preprocessed_without_the_pipeline_names_every_differing_key(
    tmp_path: Path, fingerprint
) -> None:
    pipe = _pipeline(tmp_path, tmp_path / "prep")
    prep = _prep(tmp_path, fingerprint, None)
    with pytest.raises(PlanError) as exc:
        check_plan_overrides(pipe, prep)
    msg = str(exc.value)
    assert "\n" not in msg
    # spatial_dims = 3 is what the data gives anyway, so it is the only key that agrees
    differ = msg.split("[plan]: ")[1].split(" differ")[0].split(", ")
    assert differ == sorted(set(pipe.plan) - {"spatial_dims"})
    assert f"medseg preprocess --pipeline {pipe.path}" in msg


def test_one_changed_merged_key_is_enough(tmp_path: Path, fingerprint) -> None:
    pipe = _pipeline(tmp_path, tmp_path / "prep")
    prep = _prep(tmp_path, fingerprint, {**pipe.plan, "network": {"depth": 2}})
    with pytest.raises(PlanError, match=r"\[plan\]: network differ"):
        check_plan_overrides(pipe, prep)


def test_no_plan_section_or_no_cache_is_not_checked(tmp_path: Path, fingerprint) -> None:
    prep = _prep(tmp_path, fingerprint, None)
    check_plan_overrides(_pipeline(tmp_path, prep, plan_toml=""), prep)
    check_plan_overrides(_pipeline(tmp_path, prep), tmp_path / "missing")


def test_cli_train_refuses_the_cache_in_one_line(tmp_path: Path, fingerprint, capsys) -> None:
    from medseg.cli import main

    prep = _prep(tmp_path, fingerprint, None)
    toml = _pipeline(tmp_path, prep).path
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--pipeline", str(toml), "--out", str(out), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "medseg preprocess --pipeline" in err[0]
    assert not out.exists()


def test_complete_pipeline_in_docs_is_accepted_and_lists_every_key(tmp_path: Path) -> None:
    """docs/train.md's TOML loads, each section passes its owner's parser, and every key the
    parsers accept is shown (commented out where it has no literal default)."""
    import dataclasses
    import re

    from medseg.preprocess.cohort import Options
    from medseg.training import TrainConfig
    from medseg.training.augment import AugmentConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "train.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert toml is not None
    path = tmp_path / "mine.toml"
    path.write_text(toml.group(1))
    pipe = load_pipeline(path)
    assert pipe.manifest is not None and pipe.prep_dir is not None
    TrainConfig.from_dict({k: v for k, v in pipe.train.items() if k != "augment"})
    AugmentConfig.from_dict(pipe.train.get("augment"))
    Options.from_dict(pipe.preprocess)
    assert set(pipe.infer) == {"tta"}
    for cls in (TrainConfig, AugmentConfig, Options):
        for f in dataclasses.fields(cls):
            if f.name != "augment":
                assert re.search(rf"^#? ?{f.name} = ", toml.group(1), re.M), f.name


def test_dicom_codes_are_read_per_label_value(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(
        '[infer.dicom_codes.2]\ntype = ["SCT", "10200004", "Liver"]\n'
        '[infer.dicom_codes.5]\ncategory = ["SCT", "49755003", "Altered Structure"]\n'
    )
    codes = dicom_codes(load_pipeline(p).infer, p)
    assert codes == {
        2: {"type": ["SCT", "10200004", "Liver"]},
        5: {"category": ["SCT", "49755003", "Altered Structure"]},
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[infer.dicom_codes.liver]\ntype = ["SCT", "1", "x"]', "not a nonzero label value"),
        ('[infer.dicom_codes.0]\ntype = ["SCT", "1", "x"]', "not a nonzero label value"),
        ('[infer.dicom_codes.1]\ntype = ["SCT", "10200004"]', "give \\[scheme, code, meaning\\]"),
        ('[infer.dicom_codes.1]\ncolour = ["SCT", "1", "x"]', "category and/or type"),
        ("[infer]\ndicom_codes = 3", "must be a table"),
    ],
)
def test_bad_dicom_codes_are_refused_naming_the_file(
    tmp_path: Path, body: str, message: str
) -> None:
    p = tmp_path / "p.toml"
    p.write_text(body + "\n")
    with pytest.raises(PlanError, match=message) as info:
        load_pipeline(p)
    assert str(p) in str(info.value)
