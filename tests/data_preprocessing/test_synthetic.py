"""Tests of the synthetic task 00 generator."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_preprocessing import synthetic
from data_preprocessing.synthetic import MIN_SIZE, make_case, make_synthetic_task

SIZE = 32
FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_task(tmp_path_factory.mktemp("raw"), seed=0, n_cases=4, n_test=2, size=SIZE)


def load_training(task: Path) -> list[tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    dataset = json.loads((task / "dataset.json").read_text())
    return [(nib.load(task / entry["image"]), nib.load(task / entry["label"])) for entry in dataset["training"]]


def best_threshold_dice(values: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of `values > t` or `values < t` against `target` over every threshold t.

    Sorting puts each candidate prediction (the k highest or the k lowest values) in a prefix, so
    the Dice of all thresholds comes from cumulative sums: 2 * TP(k) / (k + |target|).
    """
    order = np.argsort(values, kind="stable")
    hits = target[order].astype(np.int64)
    predicted = np.arange(1, len(values) + 1)
    low = 2 * np.cumsum(hits) / (predicted + hits.sum())
    high = 2 * np.cumsum(hits[::-1]) / (predicted + hits.sum())
    return float(max(low.max(), high.max()))


def test_best_threshold_dice_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=200)
    target = values + rng.normal(scale=0.8, size=200) > 0.5
    brute = 0.0
    for threshold in np.concatenate([values, [values.min() - 1]]):
        for predicted in (values > threshold, values <= threshold):
            brute = max(brute, 2 * np.sum(predicted & target) / (predicted.sum() + target.sum()))
    assert best_threshold_dice(values, target) == pytest.approx(brute)


def test_same_seed_same_task_and_other_seed_other_cases(tmp_path: Path, task: Path) -> None:
    again = make_synthetic_task(tmp_path, seed=0, n_cases=4, n_test=2, size=SIZE)
    assert (again / "dataset.json").read_text() == (task / "dataset.json").read_text()
    files = sorted(p.relative_to(task) for p in task.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.nii.gz"))
    for name in files:
        first, second = nib.load(task / name), nib.load(again / name)
        np.testing.assert_array_equal(np.asarray(first.dataobj), np.asarray(second.dataobj))
        np.testing.assert_array_equal(first.affine, second.affine)

    same, other = make_case(0, 2, SIZE), make_case(1, 2, SIZE)
    assert same.image.shape != other.image.shape or not np.array_equal(same.image, other.image)
    assert not np.array_equal(same.affine, other.affine)


def test_dataset_json_matches_files(task: Path) -> None:
    dataset = json.loads((task / "dataset.json").read_text())
    assert dataset["tensorImageSize"] == "4D"
    assert set(dataset["modality"]) == {"0", "1"} and "CT" not in dataset["modality"].values()
    assert set(dataset["labels"]) == {"0", "1", "2", "3"} and dataset["labels"]["0"] == "background"
    # Declared regions: each a set of foreground labels, each containing the next.
    regions = [set(labels) for labels in dataset["regions"].values()]
    assert regions == [{1, 2, 3}, {2, 3}, {3}]
    assert dataset["numTraining"] == len(dataset["training"]) == 4
    assert dataset["numTest"] == len(dataset["test"]) == 2
    assert sorted(p.name for p in (task / "imagesTr").iterdir()) == sorted(
        Path(e["image"]).name for e in dataset["training"])
    assert sorted(p.name for p in (task / "labelsTr").iterdir()) == sorted(
        Path(e["label"]).name for e in dataset["training"])
    assert sorted(p.name for p in (task / "imagesTs").iterdir()) == sorted(Path(e).name for e in dataset["test"])
    assert dataset["training"][0]["image"] == "./imagesTr/synthetic_000.nii.gz"
    training_names = {Path(e["image"]).name for e in dataset["training"]}
    assert training_names.isdisjoint(Path(e).name for e in dataset["test"])

    for entry in dataset["test"]:
        image = nib.load(task / entry)
        assert image.ndim == 4 and image.shape[3] == 2 and image.get_data_dtype() == np.float32


def test_images_and_labels_agree(task: Path) -> None:
    for image, label in load_training(task):
        assert image.ndim == 4 and image.shape[3] == 2 and image.get_data_dtype() == np.float32
        assert label.ndim == 3 and label.get_data_dtype() == np.uint8
        assert image.shape[:3] == label.shape
        np.testing.assert_allclose(image.affine, label.affine)
        # Header spacing agrees with the affine; both matrices are set and scanner-based.
        np.testing.assert_allclose(image.header.get_zooms()[:3], np.abs(np.diag(image.affine)[:3]), rtol=1e-6)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.header.get_qform(), image.affine, atol=1e-5)
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("index", range(6))
def test_classes_are_nested(index: int) -> None:
    label = make_case(0, index, SIZE).label
    core, whole, necrosis = label >= 2, label >= 1, label == 2
    # Edema encloses the core: every face neighbour of a core voxel is tumour.
    assert np.all(whole[ndimage.binary_dilation(core, FACE_NEIGHBOURS)])
    # The enhancing rim encloses the necrosis: every face neighbour of a necrosis voxel is core.
    assert np.all(core[ndimage.binary_dilation(necrosis, FACE_NEIGHBOURS)])
    # The same seen as holes: filling the rim covers the necrosis, filling the edema covers the core.
    assert np.all(ndimage.binary_fill_holes(label == 3)[necrosis])
    assert np.all(ndimage.binary_fill_holes(label == 1)[core])


@pytest.mark.parametrize("index", range(6))
def test_zero_outside_the_body(index: int) -> None:
    case = make_case(0, index, SIZE)
    nonzero = case.image != 0
    # A voxel is in the body in every channel or in none.
    np.testing.assert_array_equal(nonzero[..., 0], nonzero[..., 1])
    body = nonzero[..., 0]
    assert np.all(body[case.label > 0])
    assert ndimage.label(body)[1] == 1
    box = ndimage.find_objects(body.astype(np.uint8))[0]
    box_shape = tuple(s.stop - s.start for s in box)
    assert all(b < n for b, n in zip(box_shape, body.shape))
    assert body.mean() < 0.5


def test_spacings_and_affines_vary() -> None:
    cases = [make_case(0, index, SIZE) for index in range(8)]
    ratios = [max(c.spacing) / min(c.spacing) for c in cases]
    anisotropic = [c for c, r in zip(cases, ratios) if r >= 2]
    isotropic = [c for c, r in zip(cases, ratios) if r < 1.3]
    assert len(anisotropic) == 2 and len(isotropic) == 6
    for case in anisotropic:
        extent = np.array(case.label.shape) * np.array(case.spacing)
        assert case.label.shape[2] < min(case.label.shape[:2])
        assert 0.75 < extent[2] / extent[:2].mean() < 1.33
    for case in isotropic:
        assert all(0.9 <= s <= 1.1 for s in case.spacing)
    diagonals = np.array([np.diag(c.affine)[:3] for c in cases])
    assert np.any(diagonals < 0) and np.any(np.all(diagonals > 0, axis=1))
    assert len({tuple(c.affine[:3, 3]) for c in cases}) == len(cases)
    assert len({c.label.shape for c in cases}) > 1


def test_structure_sizes_at_the_default_size() -> None:
    case = make_case(0, 0, 64)
    extent = np.ptp(np.argwhere(case.label > 0), axis=0) + 1
    assert np.all((extent >= 10) & (extent <= 35))
    counts = np.bincount(case.label.ravel(), minlength=4)
    assert counts[1:].min() >= 100
    # The rim is more than one voxel thick: some rim voxels lie two voxels deep inside it.
    rim = case.label == 3
    assert ndimage.binary_erosion(rim, FACE_NEIGHBOURS).any()
    # Foreground is a small part of the volume, so predicting foreground everywhere scores low.
    assert counts[1:].sum() / case.label.size < 0.1


def test_single_channel_threshold_misses_a_class() -> None:
    case = make_case(0, 0, 64)
    body = case.image[..., 0] != 0
    best = {
        cls: max(best_threshold_dice(case.image[..., channel][body], (case.label == cls)[body]) for channel in (0, 1))
        for cls in (1, 2, 3)
    }
    assert min(best.values()) < 0.9, best


def test_rerun_replaces_the_task_and_leaves_no_temporary_folders(tmp_path: Path) -> None:
    first = make_synthetic_task(tmp_path, seed=0, n_cases=2, n_test=1, size=SIZE)
    (first / "stale.txt").write_text("from an earlier run")
    second = make_synthetic_task(tmp_path, seed=1, n_cases=3, n_test=0, size=SIZE)
    assert second == first
    assert [p.name for p in tmp_path.iterdir()] == [synthetic.SYNTHETIC_TASK]
    assert not (second / "stale.txt").exists()
    dataset = json.loads((second / "dataset.json").read_text())
    assert dataset["numTraining"] == 3 and dataset["test"] == []
    assert len(list((second / "imagesTr").iterdir())) == 3


def test_failure_keeps_the_previous_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_synthetic_task(tmp_path, seed=0, n_cases=2, n_test=0, size=SIZE)
    before = (task / "dataset.json").read_text()

    def broken(seed: int, index: int, size: int) -> synthetic.SyntheticCase:
        if index == 1:
            raise RuntimeError("disk full")
        return make_case(seed, index, size)

    monkeypatch.setattr(synthetic, "make_case", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_synthetic_task(tmp_path, seed=5, n_cases=3, n_test=0, size=SIZE)
    assert [p.name for p in tmp_path.iterdir()] == [synthetic.SYNTHETIC_TASK]
    assert (task / "dataset.json").read_text() == before


def test_failed_final_move_restores_the_previous_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_synthetic_task(tmp_path, seed=0, n_cases=1, n_test=0, size=SIZE)
    before = (task / "dataset.json").read_text()
    real_replace = synthetic.os.replace

    def replace(source: Path, destination: Path) -> None:
        if Path(destination) == task and Path(source).parent == tmp_path:
            raise OSError("rename refused")
        real_replace(source, destination)

    monkeypatch.setattr(synthetic.os, "replace", replace)
    with pytest.raises(OSError, match="rename refused"):
        make_synthetic_task(tmp_path, seed=3, n_cases=1, n_test=0, size=SIZE)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [synthetic.SYNTHETIC_TASK]
    assert (task / "dataset.json").read_text() == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": MIN_SIZE - 1}, "size must be at least"),
        ({"seed": -1}, "non-negative"),
        ({"n_cases": 0}, "at least one training case"),
        ({"n_test": -1}, "at least one training case"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_synthetic_task(tmp_path, **{"n_cases": 1, "n_test": 0, "size": SIZE, **kwargs})
    assert list(tmp_path.iterdir()) == []
