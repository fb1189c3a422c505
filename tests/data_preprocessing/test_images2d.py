import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import preprocess
from data_preprocessing.images2d import convert_folder, read_mask, to_volume, write_mask_png
from data_preprocessing.layouts import PreprocessingError
from data_preprocessing.preprocessor import preprocess_task
from nnunet.export import write_prediction


def disc(seed: int, shape=(40, 52), rgb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (class 1) with a small square (class 2) inside, on noise; (H, W) or (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centre = (shape[0] // 2 + seed % 5, shape[1] // 2 - seed % 4)
    mask = (((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) < 12**2).astype(np.uint8)
    mask[centre[0] - 3: centre[0] + 3, centre[1] - 3: centre[1] + 3] = 2
    image = np.clip(rng.normal(60, 15, shape) + 70 * mask, 1, 255).astype(np.uint8)
    if rgb:
        image = np.stack([image, 255 - image, image // 2], axis=-1)
    return image, mask


def write_folder(root: Path, n: int = 3, binary: bool = False, rgb: bool = False, test: str | None = None,
                 suffix: str = ".png") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`root/images`, `root/masks` (+ `test/`): returns {case_id: (image, mask as stored)}."""
    cases = {}
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index in range(n + (1 if test else 0)):
        image, mask = disc(index, rgb=rgb)
        stored = ((mask > 0) * 255).astype(np.uint8) if binary else mask
        case_id = f"cell_{index}"
        if index < n:
            Image.fromarray(image).save(root / "images" / f"{case_id}{suffix}")
            Image.fromarray(stored).save(root / "masks" / f"{case_id}{suffix}")
        elif test == "plain":
            (root / "test").mkdir(exist_ok=True)
            Image.fromarray(image).save(root / "test" / f"{case_id}{suffix}")
        else:
            for sub in ("images", "masks"):
                (root / "test" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "test" / "images" / f"{case_id}{suffix}")
            Image.fromarray(stored).save(root / "test" / "masks" / f"{case_id}{suffix}")
        cases[case_id] = (image, stored)
    return cases


def test_conversion_keeps_orientation_and_maps_binary_masks(tmp_path):
    cases = write_folder(tmp_path / "Cells", binary=True, test="labelled")
    target = convert_folder(tmp_path / "Cells", tmp_path / "converted")
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["png_masks"] == {"scale": 255} and dataset["labels"] == {"0": "background", "1": "foreground"}
    assert dataset["modality"] == {"0": "intensity"} and dataset["numTraining"] == 3
    assert dataset["test"] == ["./imagesTs/cell_3.nii.gz"]
    image, mask = cases["cell_0"]
    volume = nib.load(str(target / "imagesTr" / "cell_0.nii.gz"))
    assert volume.shape == (52, 40, 1) and volume.header.get_zooms() == (1.0, 1.0, 1.0)
    data = np.asanyarray(volume.dataobj)
    assert data[7, 3, 0] == image[3, 7]  # x runs along the columns, y along the rows
    label = np.asanyarray(nib.load(str(target / "labelsTr" / "cell_0.nii.gz")).dataobj)
    np.testing.assert_array_equal(label[:, :, 0].T, mask // 255)
    test_label = np.asanyarray(nib.load(str(target / "labelsTs" / "cell_3.nii.gz")).dataobj)
    np.testing.assert_array_equal(test_label[:, :, 0].T, cases["cell_3"][1] // 255)


def test_class_id_masks_colour_images_and_tiff(tmp_path):
    cases = write_folder(tmp_path / "Rgb", rgb=True, suffix=".tif", test="plain")
    target = convert_folder(tmp_path / "Rgb", tmp_path / "converted")
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["png_masks"] == {"scale": 1} and dataset["modality"] == {"0": "red", "1": "green", "2": "blue"}
    assert dataset["labels"] == {"0": "background", "1": "class 1", "2": "class 2"}
    volume = np.asanyarray(nib.load(str(target / "imagesTr" / "cell_1.nii.gz")).dataobj)
    image, _ = cases["cell_1"]
    assert volume.shape == (52, 40, 1, 3)
    np.testing.assert_array_equal(volume[:, :, 0, :], image.transpose(1, 0, 2))
    assert (target / "imagesTs" / "cell_3.nii.gz").is_file() and not (target / "labelsTs").exists()


def test_palette_masks_give_their_indices(tmp_path):
    mask = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = Image.fromarray(mask, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(to_volume(mask)[:, :, 0], mask.T)


def test_preprocess_plans_a_2d_task_from_images(tmp_path):
    write_folder(tmp_path / "raw" / "Cells", binary=True, test="labelled")
    argv = ["--task", "Cells", "--data", str(tmp_path / "raw"), "--results", str(tmp_path / "out"), "--n_jobs", "1"]
    assert preprocess.main(argv) == 0
    assert preprocess.main([*argv, "--exec_mode", "test"]) == 0
    folder = tmp_path / "out" / "Cells_2d"
    config = json.loads((folder / "config.json").read_text())
    assert config["dim"] == 2 and config["task"] == "Cells" and config["spacing"] == [1.0, 1.0, 1.0]
    assert len(config["patch_size"]) == 2 and config["png_masks"] == {"scale": 255}
    # Dark pixels belong to the picture: the z-score uses every pixel.
    assert config["normalization"] == [{"type": "zscore", "nonzero": False}]
    image = np.load(folder / "cell_0_x.npy")
    assert image.shape[:2] == (1, 1)
    assert image.mean() == pytest.approx(0, abs=0.05) and image.std() == pytest.approx(1, abs=0.05)
    assert np.load(folder / "cell_0_y.npy").max() == 1
    assert (folder / "test" / "cell_3_x.npy").is_file()


def test_predictions_come_back_as_png_masks(tmp_path):
    cases = write_folder(tmp_path / "raw" / "Cells", binary=True, test="labelled")
    preprocess_task(tmp_path / "raw", tmp_path / "out", "Cells", exec_mode="test")
    folder = tmp_path / "out" / "Cells_2d" / "test"
    meta = json.loads((folder / "cell_3_meta.json").read_text())
    assert meta["png_masks"] == {"scale": 255}
    # Probabilities that are the true mask, on the preprocessed grid.
    converted = tmp_path / "out" / "Cells_2d" / "nifti" / "labelsTs" / "cell_3.nii.gz"
    truth = np.asanyarray(nib.load(str(converted)).dataobj).transpose(2, 1, 0)
    (d0, d1), (h0, h1), (w0, w1) = meta["crop_box"]
    cropped = torch.from_numpy(truth[d0:d1, h0:h1, w0:w1].astype(np.int64))
    probabilities = torch.nn.functional.one_hot(cropped, 2).permute(3, 0, 1, 2).float()
    write_prediction(tmp_path / "predictions", meta, probabilities)
    written = np.asarray(Image.open(tmp_path / "predictions" / "cell_3.png"))
    np.testing.assert_array_equal(written, cases["cell_3"][1])
    assert (tmp_path / "predictions" / "cell_3.nii.gz").is_file()


def test_write_mask_png_scales_labels(tmp_path):
    labels = np.array([[0, 1], [2, 0], [1, 1]], np.uint8)[:, :, None]  # (X, Y, 1)
    write_mask_png(tmp_path / "m.png", labels, scale=100)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), labels[:, :, 0].T * 100)


def test_rerun_converts_only_changed_files(tmp_path):
    write_folder(tmp_path / "Cells")
    target = convert_folder(tmp_path / "Cells", tmp_path / "converted")
    converted = target / "labelsTr" / "cell_1.nii.gz"
    os.utime(converted, (1_500_000_000, 1_500_000_000))  # newer than its source below: left as it is
    os.utime(tmp_path / "Cells" / "masks" / "cell_1.png", (1_000_000_000, 1_000_000_000))
    source = tmp_path / "Cells" / "masks" / "cell_2.png"
    changed = np.zeros((40, 52), np.uint8)
    changed[:5, :5] = 1
    changed[5:8, 5:8] = 2
    Image.fromarray(changed).save(source)
    os.utime(source, (2_000_000_000, 2_000_000_000))
    convert_folder(tmp_path / "Cells", target)
    assert converted.stat().st_mtime == 1_500_000_000
    label = np.asanyarray(nib.load(str(target / "labelsTr" / "cell_2.nii.gz")).dataobj)
    np.testing.assert_array_equal(label[:, :, 0].T, changed)


def break_folder(root: Path, how: str) -> None:
    if how == "missing mask":
        (root / "masks" / "cell_1.png").unlink()
    elif how == "extra mask":
        Image.fromarray(np.zeros((40, 52), np.uint8)).save(root / "masks" / "stray.png")
    elif how == "size":
        Image.fromarray(np.zeros((30, 52), np.uint8)).save(root / "masks" / "cell_1.png")
    elif how == "colour mask":
        Image.fromarray(np.dstack([np.eye(40, 52, dtype=np.uint8)] * 2 + [np.zeros((40, 52), np.uint8)])).save(
            root / "masks" / "cell_1.png")
    elif how == "gap":
        mask = np.zeros((40, 52), np.uint8)
        mask[:3, :3] = 7
        Image.fromarray(mask).save(root / "masks" / "cell_1.png")
    elif how == "channels":
        image, _ = disc(1, rgb=True)
        Image.fromarray(image).save(root / "images" / "cell_1.png")
    elif how == "not an image":
        (root / "images" / "cell_1.png").write_bytes(b"no pixels here")


@pytest.mark.parametrize("how, message", [
    ("missing mask", "cell_1: "), ("extra mask", "stray: mask"), ("size", "is 52x30 pixels but its image is 52x40"),
    ("colour mask", "is a colour image"), ("gap", "not consecutive class ids"), ("channels", "channel(s) but other"),
    ("not an image", "cell_1: cannot read"),
])
def test_bad_folders_fail_with_one_line(tmp_path, capsys, how, message):
    write_folder(tmp_path / "raw" / "Cells")
    break_folder(tmp_path / "raw" / "Cells", how)
    argv = ["--task", "Cells", "--data", str(tmp_path / "raw"), "--results", str(tmp_path / "out")]
    assert preprocess.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "out" / "Cells_2d" / "nifti" / "dataset.json").exists()
    assert not (tmp_path / "out" / "Cells_2d" / "config.json").exists()


def test_2d_images_refuse_3d_and_accept_named_classes(tmp_path):
    write_folder(tmp_path / "raw" / "Cells")
    with pytest.raises(PreprocessingError, match="--dim 2"):
        preprocess_task(tmp_path / "raw", tmp_path / "out", "Cells", dim=3)
    (tmp_path / "raw" / "Cells" / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "cell", "2": "nucleus", "3": "debris"}}))
    summary = preprocess_task(tmp_path / "raw", tmp_path / "out", "Cells")
    assert summary.config["labels"] == {"0": "background", "1": "cell", "2": "nucleus", "3": "debris"}
