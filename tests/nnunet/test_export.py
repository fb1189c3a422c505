"""Geometry round trip: an oracle that predicts the preprocessed label gets the source label back exactly."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_preprocessing.preprocessor import preprocess_task
from nnunet.export import place_in_source, to_labels, unpad, write_prediction
from tests.factories import blob_case, write_msd_task

N_CLASS = 3


def one_hot(label: np.ndarray) -> torch.Tensor:
    """(1, D, H, W) labels -> (K, D, H, W) probabilities of an oracle."""
    return torch.nn.functional.one_hot(torch.from_numpy(label[0]).long(), N_CLASS).permute(3, 0, 1, 2).float()


def flipped_affine(spacing):
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, -12.0, 7.5]
    return affine


GEOMETRIES = {
    # every case at the target spacing: only cropping and padding to undo
    "isotropic cropped": [blob_case(f"c{i}", shape=(22, 18, 14), seed=i) for i in range(3)],
    "isotropic uncropped": [blob_case(f"c{i}", shape=(22, 18, 14), seed=i, margin=0) for i in range(3)],
    # one case with 2 mm slices among 1 mm ones: upsampled along z, then brought back
    "thick slices upsampled": [blob_case("thick", shape=(20, 18, 9), spacing=(1.0, 1.0, 2.0)),
                               *[blob_case(f"c{i}", shape=(20, 18, 18), seed=i) for i in range(2)]],
    # an anisotropic task (3.5 / 4.5 mm slices, target 3.6 mm) resampled with order 0 along z
    "anisotropic separate z": [blob_case("coarse", shape=(18, 16, 6), spacing=(0.8, 0.8, 4.5)),
                               *[blob_case(f"c{i}", shape=(18, 16, 8), spacing=(0.8, 0.8, 3.5), seed=i)
                                 for i in range(3)]],
}


@pytest.mark.parametrize("dim", [3, 2])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_oracle_prediction_equals_the_source_label(tmp_path, geometry, dim):
    cases = GEOMETRIES[geometry]
    for case in cases:
        case.affine = flipped_affine(case.spacing) if case.case_id.endswith("1") else None
    task = write_msd_task(tmp_path / "raw", "Task50_Geometry", cases)
    preprocess_task(task.root.parent, tmp_path / "data", "50", dim=dim)
    folder = tmp_path / "data" / f"50_{dim}d"
    metas = {}
    for case in cases:
        meta = metas[case.case_id] = json.loads((folder / f"{case.case_id}_meta.json").read_text())
        label = np.load(folder / f"{case.case_id}_y.npy")
        path = write_prediction(tmp_path / "out", meta, one_hot(label))
        written = nib.load(str(path))
        source = nib.load(str(task.root / "labelsTr" / f"{case.case_id}.nii.gz"))
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), case.label)
    if geometry == "anisotropic separate z" and dim == 3:
        coarse = metas["coarse"]
        assert coarse["separate_z"] == 0 and coarse["resampled_shape"][0] > coarse["cropped_shape"][0]


def test_probabilities_are_saved_on_the_source_grid(tmp_path):
    cases = [blob_case(f"c{i}", shape=(16, 14, 12), seed=i) for i in range(2)]
    task = write_msd_task(tmp_path / "raw", "Task51_Probs", cases)
    preprocess_task(task.root.parent, tmp_path / "data", "51")
    folder = tmp_path / "data" / "51_3d"
    meta = json.loads((folder / "c0_meta.json").read_text())
    probabilities = torch.softmax(torch.randn(N_CLASS, *meta["shape"]), 0)
    write_prediction(tmp_path / "out", meta, probabilities, save_probs=True)
    saved = np.load(tmp_path / "out" / "c0_probs.npz")["probabilities"]
    assert saved.dtype == np.float16 and saved.shape == (N_CLASS, *cases[0].label.shape)
    np.testing.assert_allclose(saved.astype(np.float32).sum(0), 1, atol=5e-3)
    labels = np.asanyarray(nib.load(str(tmp_path / "out" / "c0.nii.gz")).dataobj)
    np.testing.assert_array_equal(saved.astype(np.float32).argmax(0), labels)
    assert not list(Path(tmp_path / "out").glob(".*"))


def test_place_and_unpad_by_hand():
    meta = {"original_shape": [4, 3, 2], "crop_box": [[0, 1], [1, 3], [2, 4]]}
    cropped = np.array([[[1, 2], [3, 4]]], np.uint8)  # (d, h, w) = (1, 2, 2)
    full = place_in_source(cropped, meta)
    assert full.shape == (4, 3, 2)  # (X, Y, Z)
    assert full[2, 1, 0] == 1 and full[3, 1, 0] == 2 and full[2, 2, 0] == 3 and full[3, 2, 0] == 4
    assert full.sum() == 10
    stacked = place_in_source(np.stack([cropped, cropped]).astype(np.float32), meta, fill=[1.0, 0.0])
    assert stacked.shape == (2, 4, 3, 2) and stacked[0, 0, 0, 0] == 1 and stacked[1, 0, 0, 0] == 0
    volume = torch.arange(2 * 5 * 4 * 3).reshape(2, 5, 4, 3)
    assert unpad(volume, [[1, 2], [0, 1], [1, 1]]).shape == (2, 2, 3, 1)


def test_region_probabilities_become_the_innermost_label():
    probabilities = torch.zeros(3, 1, 1, 4)
    probabilities[0, ..., 1:] = 0.9  # whole tumour on voxels 1-3
    probabilities[1, ..., 2:] = 0.8  # core on 2-3
    probabilities[2, ..., 3] = 0.7  # enhancing on 3
    labels = to_labels(probabilities, [[1, 2, 3], [2, 3], [3]])
    np.testing.assert_array_equal(labels[0, 0], [0, 1, 2, 3])


@pytest.mark.parametrize("order", ["xyz", "zyx"])
@pytest.mark.parametrize("separate_z", [None, 0])
def test_slabs_equal_the_whole_volume_way_back(tmp_path, monkeypatch, order, separate_z):
    """Labels and the streamed probabilities file, a few rows at a time, equal resampling every class of the whole
    volume at once and placing it in the source."""
    from data_preprocessing.resample import resample_probabilities
    from nnunet import export

    monkeypatch.setattr(export, "SLAB_BYTES", 3 * 4 * 9 * 11)  # about one row of the crop per slab
    meta = {"case_id": "c", "shape": [9, 12, 13], "pad": [[1, 0], [0, 2], [1, 1]], "cropped_shape": [5, 9, 11],
            "separate_z": separate_z, "crop_box": [[2, 7], [1, 10], [0, 11]], "array_order": order}
    meta["original_shape"] = [8, 12, 11] if order == "zyx" else [11, 12, 8]
    scores = torch.softmax(torch.randn(N_CLASS, *meta["shape"]), 0).half()
    fill = export.outside_fill(N_CLASS, None)
    with export.ProbabilityFile(tmp_path / "c_probs.npz", meta, fill) as stream:
        labels = export.crop_labels([(scores, meta)], consumers=[stream])
    whole = resample_probabilities(unpad(scores, meta["pad"]).float(), meta["cropped_shape"], separate_z)
    np.testing.assert_array_equal(labels, to_labels(whole))
    saved = np.load(tmp_path / "c_probs.npz")["probabilities"]
    expected = place_in_source(whole.numpy().astype(np.float16), meta, fill=fill)
    assert saved.shape == expected.shape == (N_CLASS, *meta["original_shape"])
    np.testing.assert_allclose(saved.astype(np.float32), expected.astype(np.float32), atol=1e-3)
    assert [path.name for path in tmp_path.iterdir()] == ["c_probs.npz"]


def test_a_failed_probability_stream_leaves_no_file(tmp_path):
    from nnunet import export

    meta = {"original_shape": [4, 3, 2], "crop_box": [[0, 2], [0, 3], [0, 4]], "cropped_shape": [2, 3, 4]}
    with pytest.raises(ValueError), export.ProbabilityFile(tmp_path / "c_probs.npz", meta, [1.0, 0.0]):
        raise ValueError("prediction failed")
    assert not list(tmp_path.iterdir())
