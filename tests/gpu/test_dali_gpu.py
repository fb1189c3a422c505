"""DALI training pipeline on the GPU: the CPU pipeline's batches, aligned, with foreground when asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_loading import dali_loader
from data_loading.dali_iterator import DaliLoader
from data_loading.dali_loader import Augmentations, Device, select_device, training_pipeline
from tests.data_loading.conftest import PATCH, blob_label, indexed_image, write_case
from tests.data_loading.test_dali_loader import (
    ALIGNMENT_PATCH,
    NO_AUGMENTATION,
    SPATIAL_ONLY,
    check_alignment,
    files,
    structured_case,
)

pytestmark = pytest.mark.gpu

CPU, GPU = Device("cpu", None), Device("gpu", 0)


def loader(folder: Path, device: Device, crop_shape=PATCH, oversampling: float = 0.4, augment=NO_AUGMENTATION,
           batch_size: int = 4, length: int = 4, seed: int = 0) -> DaliLoader:
    images, labels = files(folder)
    pipeline = training_pipeline(
        image_files=images, label_files=labels, crop_shape=list(crop_shape), oversampling=oversampling,
        augment=augment, device=device, shuffle_seed=seed, planar=False, batch_size=batch_size, num_threads=2,
        device_id=device.device_id, seed=seed, prefetch_queue_depth=2)
    return DaliLoader(pipeline, ["image", "label"], length)


def on_cpu(batch: dict) -> dict:
    return {key: value.cpu() for key, value in batch.items()}


def labelled_task(folder: Path, n_cases: int = 4) -> Path:
    for index in range(n_cases):
        write_case(folder, f"case_{index:03d}", indexed_image(index), blob_label(value=1 + index % 2))
    return folder


def test_the_gpu_is_chosen_when_asked_for() -> None:
    assert select_device(1, local_rank=0) == GPU


def test_gpu_batches_match_the_cpu_pipeline(tmp_path: Path) -> None:
    labelled_task(tmp_path)
    # Files are read and cropped on the CPU in both: without augmentation the same seed gives the same patches.
    cpu = list(loader(tmp_path, CPU, seed=5))
    gpu = list(loader(tmp_path, GPU, seed=5))
    assert len(cpu) == len(gpu) == 4
    for on_host, on_device in zip(cpu, gpu):
        assert on_device["image"].device.type == "cuda" and on_device["label"].device.type == "cuda"
        for key in ("image", "label"):
            assert on_device[key].shape == on_host[key].shape and on_device[key].dtype == on_host[key].dtype
        assert torch.equal(on_device["image"].cpu(), on_host["image"])
        assert torch.equal(on_device["label"].cpu(), on_host["label"])


def test_augmented_gpu_batches_have_the_cpu_shapes_dtypes_and_labels(tmp_path: Path) -> None:
    labelled_task(tmp_path)
    cpu = list(loader(tmp_path, CPU, augment=Augmentations(), length=6))
    gpu = [on_cpu(batch) for batch in loader(tmp_path, GPU, augment=Augmentations(), length=6)]
    for on_host, on_device in zip(cpu, gpu):
        assert on_device["image"].shape == on_host["image"].shape == (4, 2, *PATCH)
        assert on_device["label"].shape == on_host["label"].shape == (4, 1, *PATCH)
        assert on_device["image"].dtype == torch.float32 and on_device["label"].dtype == torch.uint8
        assert torch.isfinite(on_device["image"]).all()
    labels = {int(v) for batch in gpu for v in batch["label"].unique()}
    assert labels <= {0, 1, 2} and labels == {int(v) for batch in cpu for v in batch["label"].unique()}


@pytest.mark.parametrize("augmentation", ["ZOOM_PROB", "ROTATION_PROB", "SCALE_PROB", None])
def test_spatial_augmentations_keep_image_and_label_aligned_on_the_gpu(tmp_path: Path, monkeypatch,
                                                                      augmentation) -> None:
    if augmentation:  # make this one happen on every patch
        monkeypatch.setattr(dali_loader, augmentation, 1.0)
    for index in range(3):
        write_case(tmp_path, f"case_{index:03d}", *structured_case(index))
    for batch in loader(tmp_path, GPU, crop_shape=ALIGNMENT_PATCH, oversampling=1.0, augment=SPATIAL_ONLY):
        check_alignment(on_cpu(batch))


def test_oversampling_one_always_holds_foreground_on_the_gpu(tmp_path: Path) -> None:
    labelled_task(tmp_path)
    hits = [bool(label.any()) for batch in loader(tmp_path, GPU, oversampling=1.0, augment=Augmentations(),
                                                  batch_size=8, length=25)
            for label in batch["label"]]
    assert len(hits) == 200 and all(hits)


def test_patches_of_128_cubed_with_four_channels(tmp_path: Path) -> None:
    # The size the GPU benchmarks train on: the pipeline fits and keeps its dtypes.
    shape = (144, 144, 144)
    label = np.zeros((1, *shape), np.uint8)
    label[0, 60:80, 60:80, 60:80] = 1
    for index in range(2):
        image = np.random.default_rng(index).standard_normal((4, *shape), dtype=np.float32)
        write_case(tmp_path, f"case_{index:03d}", image, label)
    batches = list(loader(tmp_path, GPU, crop_shape=(128, 128, 128), oversampling=1.0, augment=Augmentations(),
                          batch_size=2, length=2))
    assert all(b["image"].shape == (2, 4, 128, 128, 128) and b["label"].shape == (2, 1, 128, 128, 128)
               for b in batches)
    assert all(bool(label.any()) for b in batches for label in b["label"])
