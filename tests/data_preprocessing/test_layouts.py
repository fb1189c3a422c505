import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import main
import preprocess
from data_loading.data_module import read_splits
from data_preprocessing import configs
from data_preprocessing.layouts import PreprocessingError, locate_task, v2_labels
from data_preprocessing.preprocessor import preprocess_task
from data_preprocessing.tasks import open_task
from nnunet.callbacks import epoch_history
from nnunet.export import write_prediction
from tests.conftest import train_argv
from tests.factories import blob_case, save_nifti, write_msd_task
from utils.args import preprocess_parser


def write_v2_task(parent: Path, name: str, cases, tests=(), channel_names=None, labels=None, extra=None) -> Path:
    """An nnU-Net v2 raw dataset: one file per channel, labels name -> value."""
    root = parent / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for folder, group in (("imagesTr", cases), ("imagesTs", tests)):
        for case in group:
            image = case.image if case.image.ndim == 4 else case.image[..., None]
            for channel in range(image.shape[3]):
                save_nifti(root / folder / f"{case.case_id}_{channel:04d}.nii.gz", image[..., channel],
                           case.image_affine())
            if folder == "imagesTr":
                save_nifti(root / "labelsTr" / f"{case.case_id}.nii.gz", case.label.astype(np.uint8),
                           case.image_affine())
    dataset = {"channel_names": channel_names or {"0": "T1"},
               "labels": labels or {"background": 0, "organ": 1, "lesion": 2},
               "numTraining": len(cases), "file_ending": ".nii.gz", **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def arrays(folder: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / f"{case_id}_x.npy"), np.load(folder / f"{case_id}_y.npy")


# ---------------------------------------------------------------------------------------------
# nnU-Net v2
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def two_layouts(tmp_path):
    """The same two-channel cases as an MSD task (4D images) and as an nnU-Net v2 dataset (a file per channel)."""
    cases = [blob_case(f"case_{i}", shape=(20 + 2 * i, 18, 14), seed=i, channels=2) for i in range(3)]
    tests = [blob_case("unseen_0", shape=(22, 18, 14), seed=9, channels=2)]
    modality = {"0": "T1", "1": "T2"}
    msd = write_msd_task(tmp_path / "msd", "Task42_Blobs", cases, tests, modality=modality)
    v2 = write_v2_task(tmp_path / "v2", "Dataset042_Blobs", cases, tests, channel_names=modality)
    return msd.root, v2, cases


def test_v2_layout_gives_the_same_arrays_as_msd(two_layouts, tmp_path):
    msd, v2, cases = two_layouts
    preprocess_task(msd.parent, tmp_path / "out_msd", "42")
    summary = preprocess_task(v2.parent, tmp_path / "out_v2", "42")
    assert summary.folder == tmp_path / "out_v2" / "042_3d"
    config_msd = json.loads((tmp_path / "out_msd" / "42_3d" / "config.json").read_text())
    config_v2 = json.loads((summary.folder / "config.json").read_text())
    assert config_v2["labels"] == config_msd["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert config_v2["modalities"] == {"0": "T1", "1": "T2"} and config_v2["task"] == "042"
    for key in ("spacing", "patch_size", "normalization", "network", "batch_size"):
        assert config_v2[key] == config_msd[key]
    for case in cases:
        for ours, theirs in zip(arrays(summary.folder, case.case_id),
                                arrays(tmp_path / "out_msd" / "42_3d", case.case_id)):
            np.testing.assert_array_equal(ours, theirs)
    meta = json.loads((summary.folder / "case_0_meta.json").read_text())
    assert meta["image"] == ["imagesTr/case_0_0000.nii.gz", "imagesTr/case_0_0001.nii.gz"]
    test = preprocess_task(v2.parent, tmp_path / "out_v2", "042", exec_mode="test")
    assert sorted(p.name for p in test.folder.glob("*_x.npy")) == ["unseen_0_x.npy"]


@pytest.mark.parametrize("spelling", ["42", "042", "Dataset042_Blobs"])
def test_v2_task_is_found_by_number_or_name(two_layouts, spelling):
    _, v2, _ = two_layouts
    assert locate_task(v2.parent, spelling) == v2


def test_msd_wins_a_number_and_a_name_selects_v2(two_layouts, tmp_path):
    msd, v2, _ = two_layouts
    both = tmp_path / "both"
    shutil.copytree(msd, both / msd.name)
    shutil.copytree(v2, both / v2.name)
    assert locate_task(both, "42") == both / "Task42_Blobs"
    assert locate_task(both, "Dataset042_Blobs") == both / "Dataset042_Blobs"
    assert open_task(both, "Dataset042_Blobs", tmp_path).layout == "v2"


def test_single_channel_v2_case_ids_drop_the_channel_suffix(tmp_path):
    cases = [blob_case(f"liver_{i}", seed=i) for i in range(2)]
    raw = open_task(write_v2_task(tmp_path, "Dataset007_One", cases).parent, "7", tmp_path)
    assert [case.case_id for case in raw.training] == ["liver_0", "liver_1"]
    assert raw.training[0].image == ("imagesTr/liver_0_0000.nii.gz",) and raw.key == "007"


def test_v2_region_labels_become_regions(tmp_path):
    labels = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": 3}
    names, regions = v2_labels(labels, [1, 2, 3], tmp_path / "dataset.json")
    assert names == {"0": "background", "1": "whole tumour", "2": "tumour core", "3": "enhancing tumour"}
    assert regions == [{"name": "whole tumour", "labels": [1, 2, 3]}, {"name": "tumour core", "labels": [2, 3]},
                       {"name": "enhancing tumour", "labels": [3]}]
    with pytest.raises(PreprocessingError, match="regions_class_order"):
        v2_labels(labels, None, tmp_path / "dataset.json")
    assert v2_labels({"background": 0, "liver": 1}, None, tmp_path / "d.json") == (
        {"0": "background", "1": "liver"}, None)


def break_v2(root: Path, how: str) -> None:
    dataset = json.loads((root / "dataset.json").read_text())
    if how == "png ending":
        dataset["file_ending"] = ".png"
    elif how == "count":
        dataset["numTraining"] = 5
    elif how == "gap in labels":
        dataset["labels"] = {"background": 0, "organ": 1, "lesion": 3}
    elif how == "file list":
        dataset["dataset"] = {"case_0": {}}
    elif how == "missing label":
        (root / "labelsTr" / "case_1.nii.gz").unlink()
    elif how == "missing channel":
        (root / "imagesTr" / "case_1_0001.nii.gz").unlink()
    elif how == "no background":
        dataset["labels"] = {"organ": 1, "lesion": 2}
    (root / "dataset.json").write_text(json.dumps(dataset))


@pytest.mark.parametrize("how, message", [
    ("png ending", "file_ending '.png' is not supported"),
    ("count", "numTraining is 5 but imagesTr holds 3 cases"),
    ("gap in labels", "consecutive"),
    ("file list", "'dataset' entry"),
    ("missing label", "case_1: label"),
    ("missing channel", "case_1: expected channel files _0000 to _0001"),
    ("no background", "background value 0"),
])
def test_bad_v2_datasets_fail_with_one_line(two_layouts, tmp_path, capsys, how, message):
    _, v2, _ = two_layouts
    break_v2(v2, how)
    assert preprocess.main(["--task", "42", "--data", str(v2.parent), "--results", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "out" / "042_3d").exists()


# ---------------------------------------------------------------------------------------------
# MSD dataset.json
# ---------------------------------------------------------------------------------------------
def break_msd(dataset: dict, how: str) -> None:
    if how == "test entry without image":
        dataset["test"][0] = {"img": dataset["test"][0]}
    elif how == "test entry a number":
        dataset["test"][0] = 7
    elif how == "test not a list":
        dataset["test"] = {"image": dataset["test"][0]}
    elif how == "training image a number":
        dataset["training"][1]["image"] = 5
    elif how == "training entry without label":
        del dataset["training"][0]["label"]
    elif how == "training entry a string":
        dataset["training"][0] = dataset["training"][0]["image"]
    elif how == "modality key not a number":
        dataset["modality"] = {"a": "MRI"}
    elif how == "modality keys with a gap":
        dataset["modality"] = {"0": "T1", "2": "T2"}


@pytest.mark.parametrize("how, message", [
    ("test entry without image", 'test entry 0 must be an image file or {"image": file}, got {"img": '),
    ("test entry a number", "test entry 0 must be an image file"),
    ("test not a list", "'test' must be a list"),
    ("training image a number", 'training entry 1 must be {"image": file, "label": file}, got {"image": 5'),
    ("training entry without label", "training entry 0 must be"),
    ("training entry a string", "training entry 0 must be"),
    ("modality key not a number", "the keys of 'modality' must be the channel numbers 0, got 'a'"),
    ("modality keys with a gap", "the keys of 'modality' must be the channel numbers 0, 1, got '0', '2'"),
])
def test_bad_msd_datasets_fail_with_one_line_naming_the_entry(tmp_path, capsys, how, message):
    cases = [blob_case(f"case_{i}", shape=(12, 10, 8), seed=i) for i in range(2)]
    task = write_msd_task(tmp_path / "raw", "Task43_Bad", cases, [blob_case("unseen_0", shape=(12, 10, 8), seed=5)])
    path = task.root / "dataset.json"
    dataset = json.loads(path.read_text())
    break_msd(dataset, how)
    path.write_text(json.dumps(dataset))
    assert preprocess.main(["--task", "43", "--data", str(tmp_path / "raw"), "--results", str(tmp_path / "out"),
                            "--n_jobs", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {path}: ") and message in error and "\n" not in error
    assert not list((tmp_path / "out").rglob("*"))


# ---------------------------------------------------------------------------------------------
# Regions: declared in dataset.json, written to config.json, trained with --regions
# ---------------------------------------------------------------------------------------------
def test_regions_reach_the_config_from_both_layouts_and_train(synthetic_task, tmp_path, capsys):
    msd_dataset = json.loads((synthetic_task.task_dir / "dataset.json").read_text())
    # The synthetic task as an nnU-Net v2 dataset whose labels are the regions themselves.
    v2 = tmp_path / "raw" / "Dataset100_Synthetic"
    for sub in ("imagesTr", "labelsTr"):
        (v2 / sub).mkdir(parents=True)
    for entry in msd_dataset["training"][:2]:
        source = nib.load(str(synthetic_task.task_dir / entry["image"]))
        case_id = Path(entry["image"]).name[: -len(".nii.gz")]
        for channel in range(source.shape[3]):
            nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj)[..., channel], source.affine),
                     str(v2 / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"))
        shutil.copy(synthetic_task.task_dir / entry["label"], v2 / "labelsTr" / f"{case_id}.nii.gz")
    (v2 / "dataset.json").write_text(json.dumps({
        "channel_names": msd_dataset["modality"], "numTraining": 2, "file_ending": ".nii.gz",
        "labels": {"background": 0, **msd_dataset["regions"]}, "regions_class_order": [1, 2, 3]}))
    summary = preprocess_task(tmp_path / "raw", tmp_path / "out", "100")
    expected = [{"name": name, "labels": values} for name, values in msd_dataset["regions"].items()]
    assert summary.config["regions"] == expected
    assert json.loads((synthetic_task.preprocessed(3) / "config.json").read_text())["regions"] == expected

    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--regions", "--epochs", "2", "--train_batches", "2",
                      "--learning_rate", "5e-3", "--save_ckpt")
    capsys.readouterr()
    assert main.main(argv) == 0
    epoch_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch    1"))
    assert all(f"{name} " in epoch_line for name in msd_dataset["regions"]) and "D1 " not in epoch_line
    epochs = epoch_history(results / "logs.json")
    assert sorted(epochs) == [0, 1]
    region_dice = epochs[1]["dice"]  # one Dice per region (sigmoid outputs), not per label
    assert len(region_dice) == 3 and all(0.0 <= d <= 1.0 for d in region_dice)
    checkpoint = torch.load(results / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["regions"] == expected
    # Predictions go back to label values through the regions.
    assert main.main(["--exec_mode", "predict", "--data", str(synthetic_task.preprocessed(3)), "--results",
                      str(results), "--ckpt_path", str(results / "checkpoints" / "last.ckpt"), "--save_preds",
                      "--num_workers", "2"]) == 0
    predictions = sorted((results / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 2
    for path in predictions:
        assert set(np.unique(np.asanyarray(nib.load(str(path)).dataobj)).tolist()) <= {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------
# KiTS19
# ---------------------------------------------------------------------------------------------
KITS_SHAPE = (6, 10, 12)  # (Z, Y, X): slices first, as KiTS19 stores its arrays


def kits_affine(spacing=(1.6, 1.2, 1.2)) -> np.ndarray:
    """KiTS19-like affine: array axis 0 (the slices) runs along world z, axes 1 and 2 in-plane."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = -spacing[0], -spacing[1], -spacing[2], 1.0
    affine[:3, 3] = [80.0, 60.0, -20.0]
    return affine


def write_kits(root: Path, numbers, unlabelled=(), spacing=(1.6, 1.2, 1.2)) -> dict[str, tuple]:
    """Tiny KiTS19 cases; returns {case_id: (image, label)} as stored, (Z, Y, X)."""
    written = {}
    for number in [*numbers, *unlabelled]:
        rng = np.random.default_rng(number)
        image = rng.uniform(-300, 500, KITS_SHAPE).astype(np.float32)
        label = np.zeros(KITS_SHAPE, np.uint8)
        label[1:5, 2:8, 3:10] = 1
        label[2:4, 4:6, 5:8] = 2
        folder = root / f"case_{number:05d}"
        folder.mkdir(parents=True)
        save_nifti(folder / "imaging.nii.gz", image, kits_affine(spacing))
        if number not in unlabelled:
            save_nifti(folder / "segmentation.nii.gz", label, kits_affine(spacing))
        written[folder.name] = (image, label)
    return written


@pytest.fixture
def kits(tmp_path):
    """Labelled cases 0, 1, 3 (0 and 3 are reference evaluation cases), 15 (excluded by v1.0), unlabelled 300."""
    return tmp_path / "kits19" / "data", write_kits(tmp_path / "kits19" / "data", [0, 1, 3, 15], unlabelled=[300])


def test_kits19_follows_the_reference_constants(kits, tmp_path):
    data, written = kits
    # The layout is found from the folder that holds kits19/.
    assert preprocess.main(["--task", "kits19", "--data", str(tmp_path), "--results", str(tmp_path / "out"),
                            "--n_jobs", "1"]) == 0
    folder = tmp_path / "out" / "kits19_3d"
    config = json.loads((folder / "config.json").read_text())
    assert config["spacing"] == [1.6, 1.2, 1.2] and config["patch_size"] == [128, 128, 128]
    assert config["normalization"] == [{"type": "ct", "clip_low": -79.0, "clip_high": 304.0, "mean": 101.0,
                                        "std": 76.9}]
    assert config["labels"] == {"0": "background", "1": "kidney", "2": "tumour"} and config["dim"] == 3
    assert sorted(p.name[:-len("_x.npy")] for p in folder.glob("*_x.npy")) == [
        "case_00000", "case_00001", "case_00003", "case_00015"]
    image, label = arrays(folder, "case_00001")
    assert image.shape == (1, 128, 128, 128) and label.shape == (1, 128, 128, 128)
    meta = json.loads((folder / "case_00001_meta.json").read_text())
    # Slices first: the 1.6 mm axis is D, and the spacing already matches the target (no resampling).
    assert meta["original_spacing"] == pytest.approx([1.6, 1.2, 1.2]) and meta["resampled_shape"] == list(KITS_SHAPE)
    assert meta["array_order"] == "zyx" and meta["original_shape"] == list(KITS_SHAPE)
    (d0, _), (h0, _), (w0, _) = meta["pad"]
    source_image, source_label = written["case_00001"]
    expected = (np.clip(source_image, -79.0, 304.0) - 101.0) / 76.9
    inside = (0, slice(d0, d0 + 6), slice(h0, h0 + 10), slice(w0, w0 + 12))
    np.testing.assert_allclose(image[inside], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(label[inside], source_label)
    # Padding repeats the edge, as the reference does.
    assert image[0, 0, 0, 0] == pytest.approx(expected[0, 0, 0], abs=1e-5)
    assert image[0, -1, -1, -1] == pytest.approx(expected[-1, -1, -1], abs=1e-5)

    splits = json.loads((folder / "splits.json").read_text())
    assert splits == [{"train": ["case_00001", "case_00015"], "val": ["case_00000", "case_00003"]}]
    cases = sorted(p.name[:-len("_x.npy")] for p in folder.glob("*_x.npy"))
    assert read_splits(folder / "splits.json", cases, 0) == (["case_00001", "case_00015"],
                                                             ["case_00000", "case_00003"])


def test_kits19_prediction_goes_back_to_the_file_order(kits, tmp_path):
    data, written = kits
    preprocess_task(data, tmp_path / "out", "kits19")
    folder = tmp_path / "out" / "kits19_3d"
    meta = json.loads((folder / "case_00003_meta.json").read_text())
    label = torch.from_numpy(np.load(folder / "case_00003_y.npy")[0]).long()
    probabilities = torch.nn.functional.one_hot(label, 3).permute(3, 0, 1, 2).float()
    path = write_prediction(tmp_path / "predictions", meta, probabilities)
    source = nib.load(str(data / "case_00003" / "segmentation.nii.gz"))
    predicted = nib.load(str(path))
    np.testing.assert_array_equal(np.asanyarray(predicted.dataobj), written["case_00003"][1])
    np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-4)


def test_kits19_v1_recipe_and_test_cases(kits, tmp_path):
    data, _ = kits
    out = tmp_path / "out"
    preprocess_task(data, out, "kits19")
    summary = preprocess_task(data, out, "kits19", kits_recipe="v1.0")
    folder = out / "kits19_3d"
    assert summary.config["spacing"] == [1.6, 1.0, 1.0] and summary.removed == 1
    assert not list(folder.glob("case_00015*"))
    meta = json.loads((folder / "case_00000_meta.json").read_text())
    assert meta["resampled_shape"] == [6, 12, 14]  # 10 x 1.2 / 1.0 and 12 x 1.2 / 1.0 voxels in-plane
    assert json.loads((folder / "splits.json").read_text())[0]["train"] == ["case_00001"]
    with pytest.raises(PreprocessingError, match="--kits_recipe v1.0"):
        preprocess_task(data, out, "kits19", exec_mode="test")
    test = preprocess_task(data, out, "kits19", exec_mode="test", kits_recipe="v1.0")
    assert sorted(p.name for p in test.folder.glob("*_x.npy")) == ["case_00300_x.npy"]
    assert np.load(test.folder / "case_00300_x.npy").shape == (1, 6, 12, 14)  # test cases are not padded


def test_kits_recipe_v1_on_the_command_line(kits, tmp_path, capsys):
    data, _ = kits
    assert preprocess.main(["--task", "kits19", "--kits_recipe", "v1.0", "--data", str(data), "--results",
                            str(tmp_path / "out"), "--n_jobs", "1"]) == 0
    folder = tmp_path / "out" / "kits19_3d"
    config = json.loads((folder / "config.json").read_text())
    assert config["spacing"] == [1.6, 1.0, 1.0] and config["recipe"] == "v1.0"
    assert sorted(p.name[:-len("_meta.json")] for p in folder.glob("*_meta.json")) == [
        "case_00000", "case_00001", "case_00003"]  # case 15 is excluded by v1.0
    assert "3 case(s) written" in capsys.readouterr().out


def test_kits19_split_is_omitted_without_evaluation_cases(tmp_path):
    write_kits(tmp_path / "k", [1, 2])
    summary = preprocess_task(tmp_path / "k", tmp_path / "out", "kits19")
    assert summary.splits is None and not (tmp_path / "out" / "kits19_3d" / "splits.json").exists()


def test_kits19_needs_3d_and_its_folders(tmp_path, capsys):
    write_kits(tmp_path / "k", [1])
    assert preprocess.main(["--task", "kits19", "--data", str(tmp_path / "k"), "--dim", "2"]) == 1
    assert "--dim 3" in capsys.readouterr().err
    assert preprocess.main(["--task", "kits19", "--data", str(tmp_path / "empty")]) == 1
    assert "no KiTS19 case folders" in capsys.readouterr().err


def test_kits_recipe_flag_offers_every_recipe():
    flag = next(action for action in preprocess_parser()._actions if action.dest == "kits_recipe")
    assert sorted(flag.choices) == sorted(configs.KITS19_RECIPES) and flag.default == configs.KITS19_DEFAULT_RECIPE


def test_kits19_evaluation_cases_are_the_reference_list():
    cases = configs.KITS19_EVALUATION_CASES
    assert len(cases) == len(set(cases)) == 42
    assert cases[:3] == ["case_00000", "case_00003", "case_00005"] and cases[-1] == "case_00207"
    assert all(int(case[5:]) < configs.KITS19_LABELLED_CASES for case in cases)
