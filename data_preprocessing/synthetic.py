"""Synthetic task 00: a small multi-channel MRI-like tumour segmentation task, written offline.

Each case is a 3D volume with two channels, FLAIR-like and contrast-enhanced-T1-like, showing a
"body" (the only non-zero region) that holds a tumour made of three nested classes, as in brain
tumour segmentation:

* 1 edema: a shell that encloses the tumour core;
* 2 necrosis: the centre of the core, enclosed by the enhancing rim;
* 3 enhancing tumour: a rim a few mm thick on the surface of the core.

Nesting, as generated and tested: no voxel of the core (labels 2 and 3) has a face neighbour
outside the tumour (label 0), and no necrosis voxel (label 2) has a face neighbour outside the
core (label 0 or 1). The regions whole tumour {1, 2, 3} ⊃ tumour core {2, 3} ⊃ enhancing {3} are
declared in dataset.json under "regions".

Each tissue has its own intensity in each channel: the edema boundary shows mostly in FLAIR, the
necrosis/enhancing boundary mostly in T1Gd, and about half of the cases hold a normal structure
("distractor") that is as bright as the enhancing rim in T1Gd but dark in FLAIR, so no single
channel separates every class. Shapes are ellipsoids with random axes and orientation whose
radius is modulated by smooth noise; intensities get partial-volume blur, a smooth texture, a
smooth multiplicative bias field per channel, a random gain per channel and Rician noise.
Geometry varies between cases: field of view, body position, spacing (every fourth case has
2-3 mm slices along NIfTI z with correspondingly fewer slices), origin and axis flips in the
affine.

Structure sizes are defined in mm relative to `size` (the approximate edge of the field of view
in mm, which is also its edge in voxels at ~1 mm spacing), so anisotropic cases show the same
anatomy with fewer slices.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_preprocessing.configs import SYNTHETIC_TASK

MODALITIES: dict[str, str] = {"0": "FLAIR", "1": "T1Gd"}
LABELS: dict[str, str] = {"0": "background", "1": "edema", "2": "necrosis", "3": "enhancing tumour"}
# Hierarchical regions, each a set of labels; every region contains the next one.
REGIONS: dict[str, list[int]] = {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}
CASE_PREFIX = "synthetic"
MIN_SIZE = 32  # below this, thick-slice cases rarely fit a tumour with all three layers
ANISOTROPIC_EVERY = 4  # case index % 4 == 1 gets thick slices: a quarter of the cases

# Tissues, in the order of the rows of TISSUE_MEANS.
_OUTSIDE, _NORMAL, _DISTRACTOR, _EDEMA, _NECROSIS, _ENHANCING = range(6)
# Mean intensity of each tissue per channel (FLAIR, T1Gd), relative to normal tissue.
_TISSUE_MEANS = np.array(
    [
        [0.0, 0.0],  # outside the body
        [1.0, 1.0],  # normal tissue
        [0.45, 1.75],  # distractor: normal, yet as bright as the enhancing rim in T1Gd
        [1.8, 0.85],  # edema: bright in FLAIR, barely visible in T1Gd
        [1.55, 0.45],  # necrosis: dark in T1Gd, close to edema in FLAIR
        [1.45, 1.9],  # enhancing rim: bright in T1Gd
    ],
    dtype=np.float32,
)
_TISSUE_LABEL = np.array([0, 0, 0, 1, 2, 3], dtype=np.uint8)
_MAX_ATTEMPTS = 50
_MIN_CLASS_FRACTION = 4e-4  # of the volume: about 100 voxels at 64^3


@dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        image: (X, Y, Z, C) float32, exactly 0 outside the body.
        label: (X, Y, Z) uint8 with values in {0, 1, 2, 3}.
        affine: (4, 4) voxel-to-world matrix in mm; its diagonal holds the spacing with signs.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(sx, sy, sz) in mm."""
        return tuple(float(s) for s in np.abs(np.diag(self.affine)[:3]))


def _spline_weights(n_coarse: int, n_fine: int) -> np.ndarray:
    """(n_coarse, n_fine) matrix that zooms a periodic 1D signal with a cubic spline.

    Zooming a 3D field with these matrices one axis at a time equals `scipy.ndimage.zoom(order=3,
    grid_mode=True, mode="grid-wrap")` (the spline is separable) and takes about 2 ms per 64^3 field
    instead of about 90 ms; the matrix itself is scipy's zoom applied to the unit vectors.
    """
    identity = np.eye(n_coarse, dtype=np.float32)
    return ndimage.zoom(identity, (1, n_fine / n_coarse), order=3, grid_mode=True, mode="grid-wrap")


def _smooth_noise(rng: np.random.Generator, n_fields: int, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random fields with about `cells` bumps along each axis.

    Returns:
        (n_fields, X, Y, Z) float32, each field with zero mean and unit standard deviation.
    """
    coarse = rng.standard_normal((n_fields, cells, cells, cells), dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma=(0, 1, 1, 1), mode="wrap")
    coarse -= coarse.mean(axis=(1, 2, 3), keepdims=True)
    coarse /= coarse.std(axis=(1, 2, 3), keepdims=True)
    weights = [_spline_weights(cells, n) for n in shape]
    return np.einsum("kabc,ax,by,cz->kxyz", coarse, *weights, optimize=True).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return Rotation.random(random_state=rng).as_matrix().astype(np.float32)


def _blob(
    grid: list[np.ndarray],
    center: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    modulation: np.ndarray,
    amplitude: float,
) -> np.ndarray:
    """Ellipsoid whose radius is modulated by a smooth field.

    Args:
        grid: voxel-centre coordinates in mm, three arrays that broadcast to (X, Y, Z).
        center: (3,) centre in mm.
        radii: (3,) semi-axes in mm, along the columns of `rotation`.
        rotation: (3, 3) orientation of the semi-axes.
        modulation: (X, Y, Z) smooth field; the radius is scaled by 1 + amplitude * tanh(field).
        amplitude: relative radius modulation, below 1.

    Returns:
        (X, Y, Z) bool mask.
    """
    offsets = [axis - c for axis, c in zip(grid, center)]
    squared = 0.0
    for k in range(3):
        local = rotation[0, k] * offsets[0] + rotation[1, k] * offsets[1] + rotation[2, k] * offsets[2]
        squared = squared + (local / radii[k]) ** 2
    limit = 1.0 + amplitude * np.tanh(modulation)
    return squared < limit * limit


def _axis_ratios(rng: np.random.Generator, spread: float) -> np.ndarray:
    """(3,) positive factors with product 1 that make a sphere an ellipsoid of the same volume."""
    logs = rng.uniform(-spread, spread, size=3)
    return np.exp(logs - logs.mean()).astype(np.float32)


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _geometry(rng: np.random.Generator, size: int, anisotropic: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Spacing (sx, sy, sz) in mm and shape (X, Y, Z) in voxels of one case."""
    spacing = rng.uniform(0.9, 1.1, size=3)
    if anisotropic:
        spacing[2] = rng.uniform(2.0, 3.0)
    extent = size * rng.uniform(0.92, 1.08, size=3)  # mm
    shape = tuple(max(4, int(round(e / s))) for e, s in zip(extent, spacing))
    return spacing.astype(np.float32), shape


def _tissues(
    rng: np.random.Generator, size: int, spacing: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray | None:
    """Tissue map of one case, or None when this draw lost a class (the caller draws again).

    Returns:
        (X, Y, Z) uint8 with the tissue codes _OUTSIDE ... _ENHANCING.
    """
    extent = spacing * np.array(shape, dtype=np.float32)
    # Coordinates of voxel centres in mm, centred on the field of view; sparse so they broadcast.
    axes = [(np.arange(n, dtype=np.float32) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    body_noise, edema_noise, core_noise, distractor_noise = _smooth_noise(rng, 4, shape, cells=6)
    finest = float(spacing.min())

    # Body: semi-axes 0.28-0.34 of the field of view (at most 0.34 * 1.08 / 0.92 of any axis's
    # extent), +7 % modulation, centre within +-6 %: its half-width along any axis is below 0.49 of
    # the field of view whatever the rotation, so cropping to the body always removes voxels.
    body_center = extent * rng.uniform(-0.06, 0.06, size=3)
    body_radii = extent * rng.uniform(0.28, 0.34, size=3)
    body_rotation = Rotation.from_euler("xyz", rng.uniform(-0.2, 0.2, size=3)).as_matrix().astype(np.float32)
    body = _blob(grid, body_center, body_radii, body_rotation, body_noise, 0.07)
    # The tumour stays away from the body's edge, like a tumour inside the skull.
    body_inner = _blob(grid, body_center, body_radii * 0.88, body_rotation, body_noise, 0.07)

    # Tumour sizes from the inside out, in mm; no layer thinner than a voxel in-plane.
    necrosis_radius = max(size * rng.uniform(0.07, 0.11), finest)
    rim = max(size * rng.uniform(0.04, 0.055), 1.05 * finest)
    margin = max(size * rng.uniform(0.03, 0.06), 1.05 * finest)
    core_radius = necrosis_radius + rim
    edema_radius = core_radius + margin

    tumour_center = body_center + _unit_vector(rng) * rng.uniform(0.0, 0.4) * body_radii.min()
    edema_radii = edema_radius * _axis_ratios(rng, 0.2)
    whole = _blob(grid, tumour_center, edema_radii, _random_rotation(rng), edema_noise, 0.2) & body_inner
    if not whole.any():
        return None
    # Work on the tumour's bounding box from here on: distance transforms are costly.
    box = ndimage.find_objects(whole.astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, shape))
    whole_box = np.pad(whole[box], 1)  # a false border so distances measure to the tumour's edge
    depth_in_whole = ndimage.distance_transform_edt(whole_box, sampling=spacing)[1:-1, 1:-1, 1:-1]

    core_center = tumour_center + _unit_vector(rng) * rng.uniform(0.0, 0.3) * margin
    core_radii = core_radius * _axis_ratios(rng, 0.15)
    box_grid = np.meshgrid(*(axis[b] for axis, b in zip(axes, box)), indexing="ij", sparse=True)
    core = _blob(box_grid, core_center, core_radii, _random_rotation(rng), core_noise[box], 0.15)
    # Edema encloses the core: the erosion keeps every face neighbour of a core voxel in the tumour
    # also along thick slices, where a depth in mm would not.
    core &= (depth_in_whole > 1.05 * finest) & ndimage.binary_erosion(whole_box)[1:-1, 1:-1, 1:-1]
    depth_in_core = ndimage.distance_transform_edt(np.pad(core, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    # The rim encloses the necrosis: a necrosis voxel is farther than one voxel from the core's edge.
    necrosis = (depth_in_core > rim) & ndimage.binary_erosion(core)

    tissues = np.where(body, _NORMAL, _OUTSIDE).astype(np.uint8)
    if rng.random() < 0.5:
        _add_distractor(rng, tissues, grid, size, body_center, body_radii, body_rotation, body_noise,
                        distractor_noise, tumour_center, edema_radius)
    tissues[whole] = _EDEMA
    tissue_box = tissues[box]
    tissue_box[core] = _ENHANCING
    tissue_box[necrosis] = _NECROSIS

    counts = np.bincount(tissues.ravel(), minlength=len(_TISSUE_MEANS))
    # A class of a few voxels is no segmentation target: ask for a small fraction of the volume.
    min_voxels = max(4, int(_MIN_CLASS_FRACTION * tissues.size))
    if min(counts[_EDEMA], counts[_NECROSIS], counts[_ENHANCING]) < min_voxels:
        return None
    return tissues


def _add_distractor(
    rng: np.random.Generator,
    tissues: np.ndarray,
    grid: list[np.ndarray],
    size: int,
    body_center: np.ndarray,
    body_radii: np.ndarray,
    body_rotation: np.ndarray,
    body_noise: np.ndarray,
    distractor_noise: np.ndarray,
    tumour_center: np.ndarray,
    edema_radius: float,
) -> None:
    """Mark an elongated normal structure inside the body, away from the tumour, as _DISTRACTOR."""
    radius = size * rng.uniform(0.05, 0.08)
    for _ in range(10):
        center = body_center + _unit_vector(rng) * rng.uniform(0.0, 0.6) * body_radii.min()
        if np.linalg.norm(center - tumour_center) > 1.25 * (edema_radius + radius):
            break
    else:
        return
    radii = radius * _axis_ratios(rng, 0.5)
    inside = _blob(grid, body_center, body_radii * 0.8, body_rotation, body_noise, 0.07)
    tissues[_blob(grid, center, radii, _random_rotation(rng), distractor_noise, 0.25) & inside] = _DISTRACTOR


def _intensities(rng: np.random.Generator, tissues: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """MRI-like image of a tissue map.

    Returns:
        (X, Y, Z, C) float32, exactly 0 where tissues == _OUTSIDE.
    """
    shape = tissues.shape
    n_channels = _TISSUE_MEANS.shape[1]
    means = _TISSUE_MEANS.copy()
    means[_DISTRACTOR:] += rng.normal(0.0, 0.04, size=means[_DISTRACTOR:].shape).astype(np.float32)
    # Channels first while computing: each channel is then one contiguous block.
    signal = np.take(means.T, tissues, axis=1)  # (C, X, Y, Z)
    # Partial volume: edges blurred over about 0.6 mm.
    signal = ndimage.gaussian_filter(signal, sigma=(0, *(0.6 / spacing)), mode="nearest")
    texture = _smooth_noise(rng, n_channels, shape, cells=16)
    bias = _smooth_noise(rng, n_channels, shape, cells=4)
    bias_strength = rng.uniform(0.1, 0.25, size=(n_channels, 1, 1, 1)).astype(np.float32)
    gain = np.exp(rng.uniform(np.log(100.0), np.log(1000.0), size=(n_channels, 1, 1, 1))).astype(np.float32)
    signal *= 1.0 + 0.04 * texture
    signal *= np.exp(bias_strength * bias) * gain
    # Rician noise: the magnitude of a complex signal with Gaussian noise in both parts, so the
    # image is positive inside the body, as MRI magnitudes are.
    noise_std = rng.uniform(0.05, 0.1, size=(n_channels, 1, 1, 1)).astype(np.float32) * gain
    signal += noise_std * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = noise_std * rng.standard_normal(signal.shape, dtype=np.float32)
    image = np.hypot(signal, imaginary, out=signal)
    image *= tissues != _OUTSIDE
    return np.moveaxis(image, 0, -1)


def _check_seed_and_size(seed: int, size: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} voxels for the tumour classes to fit, got {size}")


def make_case(seed: int, index: int, size: int = 64) -> SyntheticCase:
    """Generate one case in memory, determined by (seed, index, size).

    Args:
        seed: non-negative seed of the task.
        index: case number; cases with index % 4 == 1 get 2-3 mm slices along z.
        size: approximate edge of the field of view in mm (in voxels at ~1 mm spacing).

    Returns:
        The case: image (X, Y, Z, C), label (X, Y, Z), affine.

    Raises:
        ValueError: for a negative seed or index, or a size below MIN_SIZE.
        RuntimeError: when no draw fits every class (not seen at size >= MIN_SIZE).
    """
    _check_seed_and_size(seed, size)
    if index < 0:
        raise ValueError(f"case index must be non-negative, got {index}")
    rng = np.random.default_rng([seed, index])
    spacing, shape = _geometry(rng, size, anisotropic=index % ANISOTROPIC_EVERY == 1)
    for _ in range(_MAX_ATTEMPTS):
        tissues = _tissues(rng, size, spacing, shape)
        if tissues is not None:
            break
    else:
        raise RuntimeError(f"case {index}: no tumour with every class fitted in {_MAX_ATTEMPTS} draws at size {size}")
    image = _intensities(rng, tissues, spacing)
    flips = np.where(rng.random(3) < 0.25, -1.0, 1.0)
    affine = np.diag([*(flips * spacing.astype(np.float64)), 1.0])
    affine[:3, 3] = rng.uniform(-120.0, 120.0, size=3).round(2)
    return SyntheticCase(image=image, label=_TISSUE_LABEL[tissues], affine=affine)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def make_synthetic_task(data_dir: str | os.PathLike, seed: int = 0, n_cases: int = 32, n_test: int = 4,
                        size: int = 64) -> Path:
    """Write the synthetic MSD-format task `data_dir/Task00_Synthetic`, deterministically from `seed`.

    The task is written into a temporary folder beside the target and moved into place at the
    end; an existing Task00_Synthetic is replaced only once the new one is complete.

    Args:
        data_dir: folder that receives Task00_Synthetic (created if missing).
        seed: non-negative seed; the same seed and arguments give identical files.
        n_cases: training cases (imagesTr and labelsTr), synthetic_000 ... .
        n_test: test cases without labels (imagesTs), numbered after the training cases.
        size: approximate edge of a volume in voxels at ~1 mm spacing.

    Returns:
        Path of the task folder.

    Raises:
        ValueError: for n_cases < 1, n_test < 0, a negative seed or a size below MIN_SIZE.
    """
    if n_cases < 1 or n_test < 0:
        raise ValueError(f"need at least one training case and no negative test count, got {n_cases} and {n_test}")
    _check_seed_and_size(seed, size)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / SYNTHETIC_TASK
    staging = Path(tempfile.mkdtemp(prefix=f".{SYNTHETIC_TASK}.", dir=data_dir))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (staging / sub).mkdir()
        training = []
        for index in range(n_cases):
            case_id = f"{CASE_PREFIX}_{index:03d}"
            case = make_case(seed, index, size)
            _save_nifti(staging / "imagesTr" / f"{case_id}.nii.gz", case.image, case.affine)
            _save_nifti(staging / "labelsTr" / f"{case_id}.nii.gz", case.label, case.affine)
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        test = []
        for index in range(n_cases, n_cases + n_test):
            case_id = f"{CASE_PREFIX}_{index:03d}"
            case = make_case(seed, index, size)
            _save_nifti(staging / "imagesTs" / f"{case_id}.nii.gz", case.image, case.affine)
            test.append(f"./imagesTs/{case_id}.nii.gz")
        dataset = {
            "name": "Synthetic",
            "description": "Synthetic two-channel MRI-like tumours with nested classes, generated offline",
            "reference": "generated by data_preprocessing/synthetic.py",
            "release": f"seed {seed}, size {size}",
            "tensorImageSize": "4D",
            "modality": MODALITIES,
            "labels": LABELS,
            "regions": REGIONS,
            "numTraining": n_cases,
            "numTest": n_test,
            "training": training,
            "test": test,
        }
        (staging / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp creates the folder private to its owner
        if target.exists():
            # A folder cannot replace a non-empty folder in one rename: move the old one aside first
            # and put it back if the new one cannot take its place.
            previous = Path(tempfile.mkdtemp(prefix=f".{SYNTHETIC_TASK}.old.", dir=data_dir))
            os.replace(target, previous / SYNTHETIC_TASK)
            try:
                os.replace(staging, target)
            except OSError:
                os.replace(previous / SYNTHETIC_TASK, target)
                previous.rmdir()
                raise
            shutil.rmtree(previous)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
