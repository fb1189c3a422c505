"""DALI pipelines on the CPU: foreground oversampling, alignment of image and label, shapes, 2D slabs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_loading import dali_loader
from data_loading.dali_iterator import DaliLoader, training_length
from data_loading.dali_loader import (
    Augmentations,
    Device,
    benchmark_pipeline,
    case_id_of,
    rotates_in_plane_only,
    select_device,
    training_pipeline,
    volume_pipeline,
)
from tests.data_loading.conftest import BLOB, PATCH, SHAPE, blob_label, indexed_image, write_case

CPU = Device("cpu", None)
NO_AUGMENTATION = Augmentations(zoom=False, rotation=False, flips=False, intensity=False)
SPATIAL_ONLY = Augmentations(intensity=False)


def files(folder: Path) -> tuple[list[str], list[str]]:
    images = sorted(str(p) for p in folder.glob("*_x.npy"))
    return images, [p.replace("_x.npy", "_y.npy") for p in images]


def train_loader(folder: Path, crop_shape=PATCH, oversampling: float = 0.4, augment=NO_AUGMENTATION,
                 batch_size: int = 8, length: int = 10, seed: int = 0, planar: bool = False) -> DaliLoader:
    images, labels = files(folder)
    pipeline = training_pipeline(
        image_files=images, label_files=labels, crop_shape=list(crop_shape), oversampling=oversampling,
        augment=augment, device=CPU, shuffle_seed=seed, planar=planar,
        batch_size=batch_size, num_threads=2, device_id=None, seed=seed, prefetch_queue_depth=2)
    return DaliLoader(pipeline, ["image", "label"], length, slabs=planar)


def batches(loader: DaliLoader) -> list[dict]:
    return list(loader)


def blob_task(folder: Path, n_cases: int = 4, shape=SHAPE, blob=BLOB) -> Path:
    for index in range(n_cases):
        write_case(folder, f"case_{index:03d}", indexed_image(index, shape), blob_label(shape, blob))
    return folder


def uniform_hit_probability(shape, patch, blob) -> float:
    """Exact probability that a crop with independent uniform integer starts in [0, size - patch] meets the blob.

    The crop [a, a + p) meets [b0, b1) iff b0 - p < a < b1.
    """
    probability = 1.0
    for size, p, (b0, b1) in zip(shape, patch, blob):
        starts = range(0, size - p + 1)
        probability *= sum(b0 - p < a < b1 for a in starts) / len(starts)
    return probability


def foreground_fraction(loader: DaliLoader) -> tuple[float, int]:
    hits = [bool(label.any()) for batch in loader for label in batch["label"]]
    return sum(hits) / len(hits), len(hits)


# ---------------------------------------------------------------------------------------------
# Foreground oversampling
# ---------------------------------------------------------------------------------------------
def test_oversampling_one_always_holds_foreground(tmp_path: Path) -> None:
    folder = blob_task(tmp_path)
    fraction, n = foreground_fraction(train_loader(folder, oversampling=1.0, length=25))
    assert n == 200 and fraction == 1.0


def test_oversampling_one_holds_foreground_of_objects_larger_than_the_patch(tmp_path: Path) -> None:
    # A thin spherical shell much larger than the patch: most crops inside its box see only its hollow inside.
    shape, patch = (40, 40, 40), (12, 12, 12)
    z, y, x = np.ogrid[:40, :40, :40]
    radius = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    label = ((radius > 16) & (radius < 17.5)).astype(np.uint8)[None]
    for index in range(2):
        write_case(tmp_path, f"case_{index:03d}", indexed_image(index, shape), label)
    fraction, n = foreground_fraction(train_loader(tmp_path, crop_shape=patch, oversampling=1.0, length=20))
    assert n == 160 and fraction == 1.0


def test_oversampling_zero_matches_uniform_crops(tmp_path: Path) -> None:
    folder = blob_task(tmp_path)
    expected = uniform_hit_probability(SHAPE, PATCH, BLOB)
    assert 0.1 < expected < 0.5  # the geometry makes the check informative
    fraction, n = foreground_fraction(train_loader(folder, oversampling=0.0, length=60))
    bound = 4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(fraction - expected) < bound, (fraction, expected, bound)


def test_oversampling_between_zero_and_one(tmp_path: Path) -> None:
    folder = blob_task(tmp_path)
    uniform = uniform_hit_probability(SHAPE, PATCH, BLOB)
    expected = 0.4 + 0.6 * uniform
    fraction, n = foreground_fraction(train_loader(folder, oversampling=0.4, length=60))
    bound = 4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(fraction - expected) < bound, (fraction, expected, bound)
    assert uniform + bound < expected < 1 - bound  # distinguishable from both 0 and 1


def test_patch_larger_than_volume_is_padded(tmp_path: Path) -> None:
    shape = (12, 32, 32)
    for index in range(2):
        label = blob_label(shape, ((4, 6), (4, 6), (4, 6)))
        write_case(tmp_path, f"case_{index:03d}", indexed_image(index, shape), label)
    batch = next(iter(train_loader(tmp_path, oversampling=1.0, length=1, batch_size=2)))
    assert batch["image"].shape == (2, 2, *PATCH)
    # Depth 12 < 16: the crop starts at 0 and its last 4 slices are padding.
    assert torch.all(batch["image"][:, :, 12:] == 0) and torch.all(batch["image"][:, 1, :12] > 0)


# ---------------------------------------------------------------------------------------------
# Alignment of image and label through the spatial augmentations
# ---------------------------------------------------------------------------------------------
ALIGNMENT_SHAPE, ALIGNMENT_PATCH = (32, 40, 40), (24, 24, 24)


def structured_case(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Label: a box of 1 holding a box of 2, placed per case; image channel 0 = 10 * label."""
    label = np.zeros((1, *ALIGNMENT_SHAPE), np.uint8)
    offset = 2 + 4 * index
    label[0, 4:28, offset:offset + 24, 6:34] = 1
    label[0, 10:20, offset + 6:offset + 16, 12:26] = 2
    image = np.stack([10.0 * label[0], np.full(ALIGNMENT_SHAPE, float(index + 1))]).astype(np.float32)
    return image, label


def near_a_boundary(label: np.ndarray) -> np.ndarray:
    """Voxels of a (D, H, W) label map with a different label within one voxel (26-neighbourhood), and the
    patch's outer layer, next to which a warp may sample the 0 fill for the image but not for the label."""
    padded = np.pad(label, 1, mode="edge")
    near = np.zeros(label.shape, bool)
    d, h, w = label.shape
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= padded[1 + dz:1 + dz + d, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] != label
    near[[0, -1]] = near[:, [0, -1]] = near[:, :, [0, -1]] = True
    return near


def check_alignment(batch: dict) -> None:
    for image, label in zip(batch["image"].numpy(), batch["label"].numpy()):
        assert set(np.unique(label)) <= {0, 1, 2}
        expected = np.clip(np.rint(image[0] / 10.0), 0, 2)
        wrong = expected != label[0]
        # Interpolated image and nearest-neighbour label may disagree only on the object borders.
        near = near_a_boundary(label[0])
        assert not np.any(wrong & ~near)
        # The check is informative: most of the patch lies away from borders, and agrees there.
        assert near[1:-1, 1:-1, 1:-1].mean() < 0.8
        assert wrong[1:-1, 1:-1, 1:-1].mean() < 0.1


@pytest.mark.parametrize("augmentation", ["ZOOM_PROB", "ROTATION_PROB", "SCALE_PROB", None])
def test_spatial_augmentations_keep_image_and_label_aligned(tmp_path: Path, monkeypatch, augmentation) -> None:
    if augmentation:  # make this one happen on every patch
        monkeypatch.setattr(dali_loader, augmentation, 1.0)
    for index in range(3):
        write_case(tmp_path, f"case_{index:03d}", *structured_case(index))
    loader = train_loader(tmp_path, crop_shape=ALIGNMENT_PATCH, oversampling=1.0, augment=SPATIAL_ONLY, length=4)
    for batch in loader:
        check_alignment(batch)


def test_rotation_changes_patches_and_is_turned_off(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dali_loader, "ROTATION_PROB", 1.0)
    for index in range(2):
        write_case(tmp_path, f"case_{index:03d}", *structured_case(index))
    rotated = train_loader(tmp_path, augment=Augmentations(zoom=False, flips=False, intensity=False), length=2)
    plain = train_loader(tmp_path, augment=NO_AUGMENTATION, length=2)
    assert rotated.length == plain.length == 2
    # Without rotation a crop of the constant channel is constant; rotation fills the corners with 0.
    assert all(torch.any(b["image"][:, 1] == 0) for b in rotated)
    assert all(torch.all(b["image"][:, 1] > 0) for b in plain)


def test_anisotropic_patches_rotate_in_plane_only(tmp_path: Path, monkeypatch) -> None:
    assert rotates_in_plane_only([8, 64, 64]) and not rotates_in_plane_only([16, 16, 16])
    assert not rotates_in_plane_only([64, 64])
    monkeypatch.setattr(dali_loader, "ROTATION_PROB", 1.0)
    shape, patch = (12, 40, 40), (4, 16, 16)
    depth_index = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None] + 1, shape)
    for index in range(2):
        write_case(tmp_path, f"case_{index:03d}", np.stack([depth_index, depth_index]), blob_label(shape))
    loader = train_loader(tmp_path, crop_shape=patch, augment=Augmentations(zoom=False, flips=False, intensity=False),
                          length=3)
    minimum = math.inf
    for batch in loader:
        for image in batch["image"][:, 0]:
            minimum = min(minimum, float(image.min()))
            # Rotating about the depth axis keeps each slice's value away from the corners (filled with 0),
            # and the patch centre stays inside the source for any angle and scale.
            centre = image[:, 6:10, 6:10]
            assert torch.allclose(centre, centre[:, :1, :1].expand_as(centre), atol=1e-4)
            depth = centre[:, 0, 0]
            assert torch.allclose(depth - depth[0], torch.arange(4.0), atol=1e-4)
    assert minimum < 0.99  # it did rotate: slice values are >= 1, only the fill brings lower ones


def test_flips_hit_every_axis(tmp_path: Path) -> None:
    image = np.zeros((2, 16, 16, 16), np.float32)
    image[0, 0, 0, 0] = 1.0  # a corner marker; a flip of each axis moves it to another corner
    write_case(tmp_path, "case_000", image, blob_label((16, 16, 16), ((0, 1), (0, 1), (0, 1))))
    loader = train_loader(tmp_path, augment=Augmentations(zoom=False, rotation=False, intensity=False), length=8)
    corners = set()
    for batch in loader:
        for sample, label in zip(batch["image"][:, 0], batch["label"][:, 0]):
            corner = tuple(int(i) for i in np.argwhere(sample.numpy() == 1.0)[0])
            assert label[corner] == 1  # the label flipped with it
            corners.add(corner)
    assert len(corners) == 8  # 64 samples with p=0.5 per axis reach all 8 corners (miss probability < 1e-3)


def test_intensity_augmentations_change_only_the_image(tmp_path: Path, monkeypatch) -> None:
    for name in ("NOISE_PROB", "BLUR_PROB", "BRIGHTNESS_PROB", "CONTRAST_PROB"):
        monkeypatch.setattr(dali_loader, name, 1.0)
    blob_task(tmp_path, n_cases=2)
    augmented = next(iter(train_loader(tmp_path, oversampling=1.0, augment=Augmentations(zoom=False, rotation=False,
                                                                                          flips=False), seed=3)))
    plain = next(iter(train_loader(tmp_path, oversampling=1.0, seed=3)))
    assert torch.equal(augmented["label"], plain["label"])
    assert not torch.allclose(augmented["image"], plain["image"])
    # Contrast is clamped to the patch's range before it: values stay finite and within a sane band.
    assert torch.isfinite(augmented["image"]).all()


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, pairing, lengths
# ---------------------------------------------------------------------------------------------
def test_training_batches_3d(tmp_path: Path) -> None:
    blob_task(tmp_path)
    loader = train_loader(tmp_path, augment=Augmentations(), batch_size=2, length=3)
    assert len(loader) == 3
    out = batches(loader)
    assert len(out) == 3
    for batch in out:
        assert batch["image"].shape == (2, 2, *PATCH) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (2, 1, *PATCH) and batch["label"].dtype == torch.uint8


def test_images_and_labels_stay_paired_across_passes(tmp_path: Path) -> None:
    # Case k has label value k + 1 everywhere in its blob and image channel 1 = k + 1.
    for index in range(5):
        write_case(tmp_path, f"case_{index:03d}", indexed_image(index), blob_label(value=index + 1))
    seen = set()
    for batch in train_loader(tmp_path, oversampling=1.0, batch_size=3, length=12):
        for image, label in zip(batch["image"], batch["label"]):
            case_value = int(image[1, 0, 0, 0])
            assert set(label.unique().tolist()) <= {0, case_value}
            seen.add(case_value)
    assert seen == {1, 2, 3, 4, 5}


def test_each_pass_visits_every_case_once(tmp_path: Path) -> None:
    blob_task(tmp_path, n_cases=6)
    order = [int(image[1, 0, 0, 0]) for batch in train_loader(tmp_path, batch_size=3, length=6)
             for image in batch["image"]]
    passes = [order[i:i + 6] for i in range(0, 18, 6)]
    assert all(sorted(p) == [1, 2, 3, 4, 5, 6] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes


def test_2d_slabs(tmp_path: Path) -> None:
    shape = (12, 32, 32)
    depth_index = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None] + 1, shape)
    for index in range(3):
        label = blob_label(shape, ((5, 7), (4, 6), (4, 6)))
        write_case(tmp_path, f"case_{index:03d}", np.stack([depth_index, depth_index]), label)
    nvol, slices = 2, 3
    loader = train_loader(tmp_path, crop_shape=(slices, 16, 16), oversampling=1.0, planar=True, batch_size=nvol,
                          augment=Augmentations(rotation=False, intensity=False), length=4)
    for batch in loader:
        assert batch["image"].shape == (nvol * slices, 2, 16, 16) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (nvol * slices, 1, 16, 16) and batch["label"].dtype == torch.uint8
        for volume in batch["image"].view(nvol, slices, 2, 16, 16):
            # Contiguous slices, in order (2D training never flips the slice axis).
            depth = [round(float(plane[0].max()), 3) for plane in volume]
            assert depth == [depth[0] + i for i in range(slices)]


def test_volume_pipelines_give_whole_cases_in_order(tmp_path: Path) -> None:
    blob_task(tmp_path, n_cases=3)
    images, labels = files(tmp_path)
    options = dict(batch_size=1, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=2)
    evaluation = DaliLoader(volume_pipeline(image_files=images, label_files=labels, device=CPU, **options),
                            ["image", "label", "path"], 3, ordered=True)
    test = DaliLoader(volume_pipeline(image_files=images, label_files=None, device=CPU, **options),
                      ["image", "path"], 3, ordered=True)
    for _ in range(2):  # two epochs, the same cases in the same order
        out = list(evaluation)
        assert [b["case_id"] for b in out] == [["case_000"], ["case_001"], ["case_002"]]
        for index, batch in enumerate(out):
            assert batch["image"].shape == (1, 2, *SHAPE) and batch["label"].shape == (1, 1, *SHAPE)
            assert torch.equal(batch["image"][0], torch.from_numpy(np.load(images[index])))
    # An epoch stopped early: the next one still starts with the first case.
    iterator = iter(test)
    assert next(iterator)["case_id"] == ["case_000"]
    del iterator
    out = list(test)
    assert [b["case_id"] for b in out] == [["case_000"], ["case_001"], ["case_002"]]
    assert set(out[0]) == {"image", "case_id"}


@pytest.mark.parametrize("labelled", [True, False])
def test_benchmark_pipeline_gives_patches(tmp_path: Path, labelled: bool) -> None:
    blob_task(tmp_path, n_cases=2)
    images, labels = files(tmp_path)
    pipeline = benchmark_pipeline(image_files=images, label_files=labels if labelled else None, crop_shape=list(PATCH),
                                  device=CPU, shuffle_seed=0, planar=False, batch_size=2, num_threads=1,
                                  device_id=None, seed=0, prefetch_queue_depth=2)
    keys = ["image", "label"] if labelled else ["image"]
    out = list(DaliLoader(pipeline, keys, 3))
    assert len(out) == 3
    assert all(b["image"].shape == (2, 2, *PATCH) for b in out)
    assert set(out[0]) == set(keys)


def test_training_length() -> None:
    assert training_length(10, 2, 1) == 5
    assert training_length(10, 2, 2) == 3
    assert training_length(1, 4, 8) == 1
    assert training_length(10, 2, 2, train_batches=7) == 7


def test_select_device_and_case_ids() -> None:
    assert select_device(0) == Device("cpu", None)
    if not torch.cuda.is_available():
        assert select_device(1, local_rank=1) == Device("cpu", None)
    else:
        assert select_device(1, local_rank=0) == Device("gpu", 0)
    assert case_id_of("/data/01_3d/BRATS_001_x.npy") == "BRATS_001"
