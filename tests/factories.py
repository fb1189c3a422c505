"""Builders of tiny raw tasks for the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class RawCase:
    """One case: image (X, Y, Z) or (X, Y, Z, C), label (X, Y, Z) or None, spacing (sx, sy, sz)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None
    label_affine: np.ndarray | None = None

    def image_affine(self) -> np.ndarray:
        if self.affine is not None:
            return self.affine
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = [-10.0, 5.0, 2.5]
        return affine


@dataclass
class RawTask:
    root: Path
    cases: list[RawCase]
    test_cases: list[RawCase] = field(default_factory=list)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_msd_task(parent: Path, name: str, cases: list[RawCase], test_cases: list[RawCase] = (),
                   modality: dict | None = None, labels: dict | None = None) -> RawTask:
    """Write an MSD-format task folder `parent/name` and return it."""
    root = parent / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for case in cases:
        save_nifti(root / "imagesTr" / f"{case.case_id}.nii.gz", case.image.astype(np.float32), case.image_affine())
        label_affine = case.label_affine if case.label_affine is not None else case.image_affine()
        save_nifti(root / "labelsTr" / f"{case.case_id}.nii.gz", case.label.astype(np.uint8), label_affine)
        training.append({"image": f"./imagesTr/{case.case_id}.nii.gz", "label": f"./labelsTr/{case.case_id}.nii.gz"})
    test = []
    for case in test_cases:
        save_nifti(root / "imagesTs" / f"{case.case_id}.nii.gz", case.image.astype(np.float32), case.image_affine())
        test.append(f"./imagesTs/{case.case_id}.nii.gz")
    dataset = {
        "name": name,
        "modality": modality or {"0": "MRI"},
        "labels": labels or {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return RawTask(root, list(cases), list(test_cases))


def blob_case(case_id: str, shape=(24, 20, 16), spacing=(1.0, 1.0, 1.0), channels: int = 1, seed: int = 0,
              margin: int = 3, ct: bool = False) -> RawCase:
    """A body (non-zero box inside a zero margin) holding an organ (1) with a lesion (2) inside."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = np.array(shape) / 2
    radius = np.sqrt(((x - centre[0]) / shape[0]) ** 2 + ((y - centre[1]) / shape[1]) ** 2
                     + ((z - centre[2]) / shape[2]) ** 2)
    label = np.zeros(shape, np.uint8)
    label[radius < 0.3] = 1
    label[radius < 0.15] = 2
    body = np.zeros(shape, bool)
    body[margin:-margin, margin:-margin, max(1, margin // 2):-max(1, margin // 2)] = True
    label[~body] = 0
    base = np.array([-50.0 if ct else 100.0, 80.0, 160.0])
    image = np.stack([base[label] * (1 + 0.3 * c) + rng.normal(0, 5, shape) for c in range(channels)], axis=-1)
    if not ct:
        image[~body] = 0
    else:
        image[~body] = -1000.0
    image = image.astype(np.float32)
    return RawCase(case_id, image[..., 0] if channels == 1 else image, label, spacing)
