import json
import math
from pathlib import Path

import numpy as np
import pytest

import preprocess
from data_preprocessing.layouts import PreprocessingError
from data_preprocessing.planner import VOXEL_BUDGET_3D, kernels_strides, total_strides
from data_preprocessing.planning import plan_task
from data_preprocessing.plans import plan_digest
from data_preprocessing.preprocessor import preprocess_task
from data_preprocessing.tasks import open_task
from tests.factories import blob_case, write_msd_task


def check_planned(config: dict, budget: int) -> None:
    patch, spacing = config["patch_size"], config["spacing"][-config["dim"]:]
    assert math.prod(patch) <= budget
    assert (config["network"]["kernels"], config["network"]["strides"]) == kernels_strides(patch, spacing)
    for size, stride in zip(patch, total_strides(config["network"]["strides"])):
        assert size % stride == 0 and size // stride >= 4


# ---------------------------------------------------------------------------------------------
# Planning from the data
# ---------------------------------------------------------------------------------------------
def test_isotropic_dataset_larger_than_the_budget(tmp_path):
    # (X, Y, Z) = 150 x 140 x 136 voxels at 1 mm: the median case exceeds 128^3, so the patch must shrink.
    cases = [blob_case(f"big_{i}", shape=(150, 140, 136 + 2 * i), seed=i, margin=2) for i in range(3)]
    task = write_msd_task(tmp_path / "raw", "Task61_Big", cases)
    raw = open_task(task.root.parent, "61", tmp_path)
    config = plan_task(raw, 3)
    assert config["spacing"] == [1.0, 1.0, 1.0]
    check_planned(config, VOXEL_BUDGET_3D)
    assert all(p <= s for p, s in zip(config["patch_size"], [136, 140, 150]))
    assert config["network"]["kernels"][0] == [3, 3, 3] and config["normalization"] == [{"type": "zscore"}]
    assert config["batch_size"] == 2


def test_anisotropic_dataset_plans_thick_slices_apart(tmp_path):
    # 0.8 mm in-plane, 4 mm slices, 4 of 5 cases; the fifth at 2 mm: the 10th percentile rule picks the slices' target.
    spacings = [(0.8, 0.8, 4.0)] * 4 + [(0.8, 0.8, 2.0)]
    cases = [blob_case(f"thick_{i}", shape=(96, 90, 16 if s[2] == 4.0 else 32), spacing=s, seed=i)
             for i, s in enumerate(spacings)]
    task = write_msd_task(tmp_path / "raw", "Task62_Thick", cases, modality={"0": "CT"})
    config = plan_task(open_task(task.root.parent, "62", tmp_path), 3)
    expected_z = np.percentile([s[2] for s in spacings], 10)
    assert config["spacing"] == pytest.approx([expected_z, 0.8, 0.8])
    check_planned(config, VOXEL_BUDGET_3D)
    assert config["network"]["kernels"][0] == [1, 3, 3]  # no convolution across thick slices at full resolution
    assert config["normalization"][0]["type"] == "ct"
    config_2d = plan_task(open_task(task.root.parent, "62", tmp_path), 2)
    assert len(config_2d["patch_size"]) == 2 and config_2d["dim"] == 2
    check_planned(config_2d, 512**2)


# ---------------------------------------------------------------------------------------------
# --plan FILE
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def planned(tmp_path):
    cases = [blob_case(f"case_{i}", shape=(24, 20, 16), seed=i, channels=2) for i in range(3)]
    tests = [blob_case("unseen", shape=(24, 20, 16), seed=7, channels=2)]
    task = write_msd_task(tmp_path / "raw", "Task63_Plan", cases, tests, modality={"0": "T1", "1": "T2"})
    summary = preprocess_task(task.root.parent, tmp_path / "first", "63")
    return task.root.parent, summary.config


def meta(folder: Path, case_id: str) -> dict:
    return json.loads((folder / f"{case_id}_meta.json").read_text())


def test_an_edited_spacing_and_patch_are_honoured(planned, tmp_path):
    raw, config = planned
    first = meta(tmp_path / "first" / "63_3d", "case_0")
    # Without its "network" the plan gets the preset's network for the new patch (a kept one stays as written).
    plan = {key: value for key, value in config.items() if key != "network"}
    plan.update(spacing=[2.0, 2.0, 2.0], patch_size=[32, 32, 32])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert preprocess.main(["--task", "63", "--data", str(raw), "--results", str(tmp_path / "second"),
                            "--plan", str(path)]) == 0
    folder = tmp_path / "second" / "63_3d"
    second = meta(folder, "case_0")
    crop = [stop - start for start, stop in second["crop_box"]]
    assert second["target_spacing"] == [2.0, 2.0, 2.0]
    assert second["resampled_shape"] == [round(n / 2) for n in crop]
    assert first["resampled_shape"] == crop
    assert second["shape"] == [32, 32, 32]
    assert [sum(p) for p in second["pad"]] == [32 - n for n in second["resampled_shape"]]
    written = json.loads((folder / "config.json").read_text())
    assert written["spacing"] == [2.0, 2.0, 2.0] and written["patch_size"] == [32, 32, 32]
    network = written["network"]
    assert (network["kernels"], network["strides"]) == kernels_strides([32, 32, 32], [2.0, 2.0, 2.0])
    assert np.load(folder / "case_0_x.npy").shape == (2, 32, 32, 32)


def test_an_edited_normalisation_is_honoured(planned, tmp_path):
    raw, config = planned
    ct = {"type": "ct", "clip_low": 0.0, "clip_high": 100.0, "mean": 50.0, "std": 25.0}
    plan = dict(config, normalization=[ct, {"type": "zscore"}])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    preprocess_task(raw, tmp_path / "out", "63", plan=path)
    image = np.load(tmp_path / "out" / "63_3d" / "case_1_x.npy")
    assert image[0].min() >= (0 - 50) / 25 - 1e-6 and image[0].max() <= (100 - 50) / 25 + 1e-6
    assert image[0].max() == pytest.approx(2.0)  # the lesion (160) is clipped to 100


def test_editing_config_json_in_place_redoes_the_cases(planned, tmp_path):
    raw, config = planned
    out = tmp_path / "first"
    assert preprocess_task(raw, out, "63").written == 0  # same plan: every case is done
    path = out / "63_3d" / "config.json"
    path.write_text(json.dumps(dict(config, patch_size=[32, 24, 24])))
    summary = preprocess_task(raw, out, "63")
    assert summary.written == 3 and meta(out / "63_3d", "case_2")["shape"][1:] == [24, 24]
    assert meta(out / "63_3d", "case_2")["plan_digest"] == plan_digest(summary.config)
    # Renaming a class changes no array: nothing is redone.
    path.write_text(json.dumps(dict(summary.config, labels={"0": "background", "1": "liver", "2": "tumour"})))
    assert preprocess_task(raw, out, "63").written == 0
    # The test cases must follow the training plan: another plan for them alone is refused.
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(config, spacing=[1.5, 1.0, 1.0])))
    with pytest.raises(Exception, match="preprocess the training cases with it first"):
        preprocess_task(raw, out, "63", exec_mode="test", plan=other)


def test_a_2d_plan_implies_dim_2(planned, tmp_path):
    raw, config = planned
    plan = dict(config, dim=2, patch_size=[24, 16])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    # The 3D network does not fit a 2D patch: the error says so; without "network" the 2D one is planned.
    with pytest.raises(PreprocessingError, match="network's kernels have 3 axes but the patch"):
        preprocess_task(raw, tmp_path / "out", "63", plan=path)
    del plan["network"]
    path.write_text(json.dumps(plan))
    summary = preprocess_task(raw, tmp_path / "out", "63", plan=path)
    assert summary.folder == tmp_path / "out" / "63_2d" and summary.config["dim"] == 2
    assert len(summary.config["network"]["kernels"][0]) == 2


def edit(plan: dict, how: str) -> dict | str:
    plan = dict(plan)
    if how == "missing":
        del plan["patch_size"]
    elif how == "unknown":
        plan["patchsize"] = [8, 8, 8]
    elif how == "patch length":
        plan["patch_size"] = [32, 32]
    elif how == "patch type":
        plan["patch_size"] = [32, "32", 32]
    elif how == "spacing":
        plan["spacing"] = [1.0, -1.0, 1.0]
    elif how == "channels":
        plan["in_channels"] = 1
    elif how == "classes":
        plan["n_class"] = 4
    elif how == "normalization":
        plan["normalization"] = [{"type": "ct", "clip_low": 0}, {"type": "zscore"}]
    elif how == "too small":
        plan["patch_size"] = [5, 5, 5]
        del plan["network"]
    elif how == "indivisible":
        plan["patch_size"] = [30, 30, 30]
    elif how == "network stages":
        plan["network"] = dict(plan["network"], encoder_blocks=plan["network"]["encoder_blocks"][:-1])
    elif how == "network kind":
        plan["network"] = dict(plan["network"], kind="vit")
    elif how == "planner":
        plan["planner"] = "resenc_xxl"
    elif how == "regions":
        plan["regions"] = [{"name": "bad", "labels": [7]}]
    elif how == "not json":
        return "{not json"
    return plan


@pytest.mark.parametrize("how, message", [
    ("missing", "the plan has no 'patch_size'"),
    ("unknown", "unknown plan key(s) 'patchsize'"),
    ("patch length", "'patch_size' must be a list of 3 positive integers for a 3D plan"),
    ("patch type", "'patch_size' must be a list of 3 positive integers"),
    ("spacing", "'spacing' must be 3 positive numbers"),
    ("channels", "'in_channels' is 1 but the dataset has 2 channel(s)"),
    ("classes", "'n_class' is 4 but the dataset has 3 classes"),
    ("normalization", "CT normalisation of channel 0 needs numbers"),
    ("too small", "too small for a U-Net"),
    ("indivisible", "is not divisible by the network's total stride"),
    ("network stages", "network 'encoder_blocks' needs one entry per stage"),
    ("network kind", "network 'kind' must be one of unet, resenc_unet"),
    ("planner", "'planner' must be one of default, resenc_m"),
    ("regions", "'regions' must be a list"),
    ("not json", "is not valid JSON"),
])
def test_bad_plans_fail_with_one_line(planned, tmp_path, capsys, how, message):
    raw, config = planned
    path = tmp_path / "plan.json"
    edited = edit(config, how)
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    argv = ["--task", "63", "--data", str(raw), "--results", str(tmp_path / "out"), "--plan", str(path)]
    assert preprocess.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "out" / "63_3d" / "config.json").exists()


def test_plan_and_dim_must_agree(planned, tmp_path, capsys):
    raw, config = planned
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(config))
    assert preprocess.main(["--task", "63", "--data", str(raw), "--plan", str(path), "--dim", "2",
                            "--results", str(tmp_path / "out")]) == 1
    assert "is for 3D but --dim 2 was given" in capsys.readouterr().err
    assert preprocess.main(["--task", "63", "--data", str(raw), "--plan", str(tmp_path / "none.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
