"""Folders of 2D images (PNG or TIFF) with masks, converted once into an MSD task of (X, Y, 1) volumes.

Layout of the source folder::

    Name/images/<case>.png        grayscale (1 channel) or colour (RGB: 3 channels; alpha is dropped)
    Name/masks/<case>.png         one class id per pixel, same size as the image
    Name/test/<case>.png          optional unlabelled test images, or
    Name/test/images/, test/masks/  a labelled test set (its masks become labelsTs/ for evaluate.py)
    Name/dataset.json             optional: {"labels": {"0": "background", "1": "vessel"}} names the classes

Masks hold class ids 0, 1, 2, ... (palette PNGs: the palette index). Masks whose values are only 0
and 255 are binary: 255 becomes class 1, and predicted PNGs are written back as 0/255. Without a
dataset.json the classes are 0 .. the largest value, and every one of them must occur in some mask
(a gap usually means anti-aliased or rescaled masks).

Each image becomes a NIfTI volume (X, Y, 1) with a 1 mm spacing and an identity affine, its array
the transpose of the image's (rows, columns), so that the preprocessed (D, H, W) = (1, rows,
columns) shows the image upright. The converted task (`dataset.json`, `imagesTr`, `labelsTr`,
`imagesTs`, `labelsTs`) is an ordinary MSD task: training, prediction (NIfTI, plus a PNG per case)
and evaluation (`evaluate.py --lbls .../labelsTs`) work on it unchanged. A rerun converts only
files whose source is newer than the converted file.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from data_preprocessing.layouts import PreprocessingError, read_json_object, v2_labels
from utils.io import atomic_open, load_json, save_json, save_nifti
from utils.nifti import load_nifti

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
CONVERTED = "nifti"  # the converted MSD task, inside RESULTS/<Name>_2d
BINARY_MASK_VALUES = {0, 255}
CHANNEL_NAMES = {1: {"0": "intensity"}, 3: {"0": "red", "1": "green", "2": "blue"}}


# --------------------------------------------------------------------------------------------
# Reading images and masks
# --------------------------------------------------------------------------------------------
def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except Exception as error:  # Pillow raises many types for damaged or foreign files
        raise PreprocessingError(f"{path.stem}: cannot read {path} ({type(error).__name__}: {error})") from None
    if getattr(image, "n_frames", 1) > 1:
        raise PreprocessingError(f"{path.stem}: {path} holds {image.n_frames} frames; only single 2D images "
                                 f"are supported")
    return image


def read_image(path: Path) -> np.ndarray:
    """Pixels of an image file: (H, W) for grayscale, (H, W, 3) for colour (palette and alpha images become RGB)."""
    image = _open(path)
    if image.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image)
        return pixels.astype(np.uint8) if pixels.dtype == bool else pixels
    if image.mode == "LA":
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """Class ids of a mask file, (H, W) int64. Palette masks give their palette indices."""
    image = _open(path)
    pixels = np.asarray(image)
    if pixels.ndim == 3:
        # A colour mask is accepted only when it is gray (all channels equal): then it holds one value per pixel.
        colour = pixels[..., :3]
        if not (colour == colour[..., :1]).all():
            raise PreprocessingError(f"{path.stem}: mask {path} is a colour image; masks must hold one class id "
                                     f"per pixel (grayscale or palette)")
        pixels = colour[..., 0]
    if pixels.dtype.kind == "f" and (not np.isfinite(pixels).all() or (pixels != np.round(pixels)).any()):
        raise PreprocessingError(f"{path.stem}: mask {path} has non-integer values")
    if (pixels < 0).any():
        raise PreprocessingError(f"{path.stem}: mask {path} has negative values")
    return pixels.astype(np.int64)


def image_files(folder: Path) -> dict[str, Path]:
    """{case_id: file} of the PNG/TIFF files of a folder, case ids being the file stems."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise PreprocessingError(f"{path.stem}: {folder} holds two files for this case, "
                                     f"{files[path.stem].name} and {path.name}")
        files[path.stem] = path
    return files


def to_volume(pixels: np.ndarray) -> np.ndarray:
    """Image pixels (H, W) or (H, W, C) -> NIfTI volume (X, Y, 1) or (X, Y, 1, C): x runs along the columns."""
    if pixels.ndim == 2:
        return np.ascontiguousarray(pixels.T[:, :, None])
    return np.ascontiguousarray(pixels.transpose(1, 0, 2)[:, :, None, :])


def write_mask_png(path: str | os.PathLike, labels: np.ndarray, scale: int = 1) -> None:
    """Write a label volume (X, Y, 1) as a PNG mask (rows = Y), each label multiplied by `scale`."""
    pixels = np.asarray(labels)[:, :, 0].T.astype(np.int64) * scale
    if pixels.max(initial=0) > 255:
        raise ValueError(f"label values up to {pixels.max() // scale} do not fit an 8-bit PNG with scale {scale}")
    with atomic_open(path, "wb") as handle:
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(handle, format="PNG")


# --------------------------------------------------------------------------------------------
# Converting a folder
# --------------------------------------------------------------------------------------------
def _save_nifti(path: Path, volume: np.ndarray) -> None:
    """Write a volume as .nii.gz with a 1 mm identity affine, atomically."""
    nifti = nib.Nifti1Image(volume, np.eye(4))
    nifti.set_qform(np.eye(4), code=1)
    nifti.set_sform(np.eye(4), code=1)
    save_nifti(path, nifti)


def _is_current(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def _pairs(images_dir: Path, masks_dir: Path | None) -> tuple[dict[str, Path], dict[str, Path]]:
    images = image_files(images_dir)
    if not images:
        raise PreprocessingError(f"{images_dir} holds no {', '.join(IMAGE_SUFFIXES)} images")
    if masks_dir is None:
        return images, {}
    masks = image_files(masks_dir)
    for case_id in images:
        if case_id not in masks:
            raise PreprocessingError(f"{case_id}: {images[case_id]} has no mask in {masks_dir}")
    for case_id in masks:
        if case_id not in images:
            raise PreprocessingError(f"{case_id}: mask {masks[case_id]} has no image in {images_dir}")
    return images, masks


def _declared_labels(source: Path) -> dict[str, str] | None:
    """Class names from an optional `dataset.json`: MSD style {"0": "background"} or v2 style {"background": 0}."""
    path = source / "dataset.json"
    if not path.is_file():
        return None
    labels = read_json_object(path).get("labels")
    if not isinstance(labels, dict) or not labels:
        raise PreprocessingError(f"{path} needs a 'labels' entry naming the classes, e.g. {{\"0\": \"background\"}}")
    if all(str(key).isdigit() and isinstance(value, str) for key, value in labels.items()):
        labels = {name: int(value) for value, name in labels.items()}
    names, _ = v2_labels(labels, None, path)
    return names


def _labels(source: Path, values: set[int], example: dict[int, Path], binary: bool) -> dict[str, str]:
    """Class names: the dataset.json's, "foreground" for binary masks, or class 1 .. the largest mask value (which
    must all occur)."""
    if max(values) > 255:
        raise PreprocessingError(f"{example[max(values)].stem}: mask {example[max(values)]} holds the value "
                                 f"{max(values)}; class ids must be below 256")
    declared = _declared_labels(source)
    if declared is not None:
        unknown = sorted(values - {int(k) for k in declared})
        if unknown:
            raise PreprocessingError(f"{example[unknown[0]].stem}: mask {example[unknown[0]]} holds class "
                                     f"{unknown[0]}, which {source / 'dataset.json'} does not declare")
        return declared
    missing = sorted(set(range(max(values) + 1)) - values)
    if missing:
        raise PreprocessingError(f"{source}: mask values {sorted(values)} are not consecutive class ids (no "
                                 f"{missing[0]}); use 0, 1, 2, ... (or 0/255 for binary masks) or name the "
                                 f"classes in {source / 'dataset.json'}")
    if binary:
        return {"0": "background", "1": "foreground"}
    return {"0": "background", **{str(v): f"class {v}" for v in range(1, max(values) + 1)}}


def convert_folder(source: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a folder of 2D images and masks (module docstring) into an MSD task at `target`.

    Args:
        source: the folder holding `images/`, `masks/` and optionally `test/`.
        target: the folder of the converted task (created).
        overwrite: convert every file again, not only new or changed ones.

    Returns:
        `target`, holding `dataset.json` (written last, with `png_masks: {"scale": s}`), `imagesTr`,
        `labelsTr`, `imagesTs` and `labelsTs`.

    Raises:
        PreprocessingError: naming the file, for unreadable files, missing masks, masks whose size differs from
            their image's, colour masks, or images with different numbers of channels.
    """
    source, target = Path(source), Path(target)
    images, masks = _pairs(source / "images", source / "masks")
    test_images, test_masks = {}, {}
    test = source / "test"
    if (test / "images").is_dir():
        test_images, test_masks = _pairs(test / "images", test / "masks" if (test / "masks").is_dir() else None)
    elif test.is_dir() and image_files(test):
        test_images = image_files(test)

    # Every mask first: binary (0/255) or class ids is a property of the whole dataset. Only each mask's values
    # and size are kept; its pixels are read again when its label is written.
    mask_shapes: dict[Path, tuple[int, ...]] = {}
    where: dict[int, Path] = {}
    for path in [*masks.values(), *test_masks.values()]:
        pixels = read_mask(path)
        mask_shapes[path] = pixels.shape
        for value in np.unique(pixels).tolist():
            where.setdefault(value, path)
    found = set(where)
    scale = 255 if found <= BINARY_MASK_VALUES and 255 in found else 1
    labels = _labels(source, {v // scale for v in found}, {v // scale: path for v, path in where.items()},
                     binary=scale == 255)

    previous = target / "dataset.json"
    rescaled = previous.is_file() and load_json(previous).get("png_masks", {}).get("scale") != scale
    channels = None
    entries: dict[str, list] = {"training": [], "test": []}
    for part, pairs, pair_masks, image_dir, label_dir in (
            ("training", images, masks, "imagesTr", "labelsTr"), ("test", test_images, test_masks, "imagesTs",
                                                                  "labelsTs")):
        for case_id, image_path in pairs.items():
            (target / image_dir).mkdir(parents=True, exist_ok=True)
            image_target = target / image_dir / f"{case_id}.nii.gz"
            if overwrite or not _is_current(image_target, image_path):
                pixels = read_image(image_path)
                shape, n_channels = pixels.shape[:2], 1 if pixels.ndim == 2 else pixels.shape[2]
                _save_nifti(image_target, to_volume(pixels))
            else:
                stored = load_nifti(image_target).shape
                shape, n_channels = stored[:2][::-1], 1 if len(stored) == 3 else stored[3]
            if channels is None:
                channels = n_channels
            if n_channels != channels:
                raise PreprocessingError(f"{case_id}: {image_path} has {n_channels} channel(s) but other images have "
                                         f"{channels}; use all grayscale or all colour images")
            entry = {"image": f"./{image_dir}/{case_id}.nii.gz"}
            if case_id in pair_masks:
                mask_path = pair_masks[case_id]
                mask_shape = mask_shapes[mask_path]
                if mask_shape != tuple(shape):
                    raise PreprocessingError(f"{case_id}: mask {mask_path} is {mask_shape[1]}x{mask_shape[0]} "
                                             f"pixels but its image is {shape[1]}x{shape[0]}")
                label_target = target / label_dir / f"{case_id}.nii.gz"
                label_target.parent.mkdir(parents=True, exist_ok=True)
                if overwrite or rescaled or not _is_current(label_target, mask_path):
                    _save_nifti(label_target, to_volume((read_mask(mask_path) // scale).astype(np.uint8)))
                entry["label"] = f"./{label_dir}/{case_id}.nii.gz"
            entries[part].append(entry if part == "training" else entry["image"])
    dataset = {
        "name": source.name,
        "description": f"2D images converted from {source}",
        "modality": CHANNEL_NAMES.get(channels, {str(c): f"channel {c}" for c in range(channels)}),
        "labels": labels,
        "numTraining": len(entries["training"]),
        "numTest": len(entries["test"]),
        "training": entries["training"],
        "test": entries["test"],
        "png_masks": {"scale": scale},
    }
    save_json(target / "dataset.json", dataset)
    return target
