"""DICOM in, DICOM SEG out: `main.py --exec_mode predict --input DICOM_DIR --output_format ...` with a checkpoint
and with a model package, compared voxel for voxel with the prediction of NIfTI files of the same volumes."""

import re
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

import main
from tests.factories import DicomGeometry, dicom_stored, save_nifti, write_dicom_series

SLOPE, INTERCEPT = 0.25, -1024.0
LABEL_NAMES = ["edema", "necrosis", "enhancing tumour"]  # the synthetic task's foreground labels


def checkpoint_argv(trained, results, *extra):
    return ["--exec_mode", "predict", "--results", str(results), "--num_workers", "2",
            "--ckpt_path", str(trained / "checkpoints" / "best.ckpt"), *extra]


def package_argv(package, raw, results, *extra):
    return ["--exec_mode", "predict", "--model", str(package), "--input", str(raw), "--results", str(results),
            *extra]


@pytest.fixture(scope="module")
def scans(synthetic_task, tmp_path_factory):
    """A synthetic test image (two channels) as two DICOM studies, one axial with a subfolder per series, one
    oblique with both series' files mixed in one folder, beside NIfTI files of the same values and geometry.

    Returns (dicom folder, nifti folder, {case: geometry}).
    """
    source = nib.load(str(synthetic_task.task_dir / "imagesTs" / "synthetic_009.nii.gz"))
    image = source.get_fdata(dtype=np.float32)  # (X, Y, Z, 2): FLAIR, T1Gd
    zooms = [float(z) for z in source.header.get_zooms()[:3]]
    root = tmp_path_factory.mktemp("dicom")
    geometries = {
        "axial": DicomGeometry(pixel_spacing=(zooms[1], zooms[0]), slice_step=zooms[2]),
        "oblique": DicomGeometry.oblique(25.0, origin=(4.0, -7.5, 60.0), pixel_spacing=(zooms[1], zooms[0]),
                                         slice_step=zooms[2]),
    }
    for case_id, geometry in geometries.items():
        study_uid = pydicom.uid.generate_uid()
        for channel, description in enumerate(["AX FLAIR", "AX T1 Gd post"]):
            folder = root / "dicom" / case_id / (description.replace(" ", "_") if case_id == "axial" else "")
            write_dicom_series(folder, image[..., channel], geometry, description=description,
                               series_number=channel + 2, study_uid=study_uid, slope=SLOPE, intercept=INTERCEPT,
                               seed=channel)
        (root / "nifti").mkdir(exist_ok=True)
        values = dicom_stored(image, SLOPE, INTERCEPT) * np.float32(SLOPE) + np.float32(INTERCEPT)
        save_nifti(root / "nifti" / f"{case_id}.nii.gz", values.astype(np.float32), geometry.ras_affine())
    return root / "dicom", root / "nifti", geometries


def source_frames(folder, description="FLAIR"):
    """The headers of the series of a study folder whose description holds `description`, sorted along the slice
    normal, read here."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in folder.rglob("*") if path.is_file()]
    headers = [h for h in headers if description in h.SeriesDescription]
    normal = np.cross(np.array(headers[0].ImageOrientationPatient[:3], dtype=float),
                      np.array(headers[0].ImageOrientationPatient[3:], dtype=float))
    headers.sort(key=lambda h: float(np.dot(np.array(h.ImagePositionPatient, dtype=float), normal)))
    return headers


def seg_labels(path, sources):
    """A DICOM SEG's segments as (X, Y, Z) label values, on the frames of `sources` (slice order)."""
    segmentation = hd.seg.segread(path)
    frames = segmentation.get_pixels_by_source_instance([str(h.SOPInstanceUID) for h in sources],
                                                        combine_segments=True, assert_missing_frames_are_empty=True)
    return segmentation, frames.transpose(2, 1, 0)


def test_dicom_input_predicts_as_nifti_and_writes_a_seg_on_the_source_frames(trained, scans, tmp_path, capsys):
    dicom, nifti, geometries = scans
    assert main.main(checkpoint_argv(trained, tmp_path / "nifti", "--input", str(nifti), "--save_preds")) == 0
    assert main.main(checkpoint_argv(trained, tmp_path / "dicom", "--input", str(dicom), "--output_format", "both",
                                     "--dicom_channels", "flair", "t1 gd")) == 0
    compared = 0
    for case_id, geometry in geometries.items():
        expected = nib.load(str(tmp_path / "nifti" / "predictions" / f"{case_id}.nii.gz"))
        written = nib.load(str(tmp_path / "dicom" / "predictions" / f"{case_id}.nii.gz"))
        reference = np.asanyarray(expected.dataobj)
        assert reference.max() > 0, "the network should find some tumour"
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), reference)
        np.testing.assert_allclose(written.affine, expected.affine, atol=1e-4)
        np.testing.assert_allclose(written.affine, geometry.ras_affine(), atol=1e-4)
        sources = source_frames(dicom / case_id)
        segmentation, labels = seg_labels(tmp_path / "dicom" / "predictions" / f"{case_id}.dcm", sources)
        np.testing.assert_array_equal(labels, reference)
        compared += labels.size
        assert segmentation.SegmentationType == "BINARY"
        assert [s.SegmentLabel for s in segmentation.SegmentSequence] == LABEL_NAMES
        assert {s.SegmentAlgorithmType for s in segmentation.SegmentSequence} == {"AUTOMATIC"}
        algorithm = segmentation.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert "nnU-Net" in algorithm.AlgorithmName
        assert segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
        assert segmentation.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        assert segmentation.StudyInstanceUID == sources[0].StudyInstanceUID
    assert compared == 2 * 34 * 28 * 12
    assert not list((tmp_path / "dicom" / "predictions").glob(".*"))  # no temporary file left


def test_a_model_package_writes_only_the_seg_with_dicom_seg(model_package, scans, tmp_path):
    dicom, nifti, _ = scans
    assert main.main(package_argv(model_package, nifti, tmp_path / "nifti")) == 0
    assert main.main(package_argv(model_package, nifti, tmp_path / "refused", "--output_format", "both")) == 1
    assert not (tmp_path / "refused" / "predictions").exists()
    # The task's channel names (FLAIR, T1Gd) are the default mapping: "T1Gd" is in no description here.
    assert main.main(package_argv(model_package, dicom, tmp_path / "dicom", "--output_format", "dicom-seg")) == 1
    assert main.main(package_argv(model_package, dicom, tmp_path / "dicom", "--output_format", "dicom-seg",
                                  "--dicom_channels", "FLAIR", "T1 Gd")) == 0
    written = sorted(path.name for path in (tmp_path / "dicom" / "predictions").iterdir())
    assert written == ["axial.dcm", "oblique.dcm"]
    for case_id in ("axial", "oblique"):
        reference = np.asanyarray(nib.load(str(tmp_path / "nifti" / "predictions" / f"{case_id}.nii.gz")).dataobj)
        _, labels = seg_labels(tmp_path / "dicom" / "predictions" / f"{case_id}.dcm", source_frames(dicom / case_id))
        np.testing.assert_array_equal(labels, reference)


@pytest.mark.parametrize("problem, message", [
    ("nifti_input", r"--output_format dicom-seg writes DICOM SEG, which references DICOM series, but case axial is "
                    r"not DICOM; use --output_format nifti"),
    ("preprocessed", r"--output_format dicom-seg needs --exec_mode predict with --input, a folder of DICOM series"),
    ("missing_slice", r"series 2 'AX FLAIR' \(.*\) is missing slices"),
    ("no_channel", r"study .*: no series matches channel 'T2w'"),
])
def test_bad_dicom_requests_are_one_line_before_any_prediction(trained, scans, synthetic_task, tmp_path, capsys,
                                                               problem, message):
    dicom, nifti, _ = scans
    extra = ["--input", str(nifti), "--output_format", "dicom-seg"]
    if problem == "preprocessed":
        extra = ["--data", str(synthetic_task.preprocessed(3)), "--output_format", "dicom-seg"]
    elif problem == "missing_slice":
        copy = shutil.copytree(dicom / "axial", tmp_path / "input" / "axial")
        sorted((copy / "AX_FLAIR").iterdir(), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))[5].unlink()
        extra = ["--input", str(tmp_path / "input"), "--dicom_channels", "flair", "gd"]
    elif problem == "no_channel":
        extra = ["--input", str(dicom), "--dicom_channels", "flair", "T2w"]
    assert main.main(checkpoint_argv(trained, tmp_path / "out", *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out" / "predictions").exists()


@pytest.fixture(scope="module")
def one_channel_checkpoint(trained, tmp_path_factory):
    """The trained network made a one-channel (CT) network: its first convolution reads the sum of both channels."""
    checkpoint = torch.load(trained / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    config = checkpoint["hyper_parameters"]["config"]
    config.update(in_channels=1, modalities={"0": "CT"}, normalization=config["normalization"][:1])
    weight = checkpoint["state_dict"]["model.encoder.0.0.conv.weight"]
    checkpoint["state_dict"]["model.encoder.0.0.conv.weight"] = weight.sum(dim=1, keepdim=True)
    path = tmp_path_factory.mktemp("one_channel") / "ct.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_one_channel_task_predicts_every_series_as_a_case(one_channel_checkpoint, synthetic_task, tmp_path):
    source = nib.load(str(synthetic_task.task_dir / "imagesTs" / "synthetic_009.nii.gz"))
    image = source.get_fdata(dtype=np.float32)[..., 0]
    zooms = [float(z) for z in source.header.get_zooms()[:3]]
    geometries = {"scan_a": DicomGeometry(pixel_spacing=(zooms[1], zooms[0]), slice_step=zooms[2]),
                  "scan_b": DicomGeometry.oblique(40.0, pixel_spacing=(zooms[1], zooms[0]), slice_step=zooms[2])}
    for case_id, geometry in geometries.items():
        write_dicom_series(tmp_path / "dicom" / case_id, image, geometry, description="CT abdomen", slope=0.5,
                           intercept=-1000.0)
        values = dicom_stored(image, 0.5, -1000.0) * np.float32(0.5) + np.float32(-1000.0)
        (tmp_path / "nifti").mkdir(exist_ok=True)
        save_nifti(tmp_path / "nifti" / f"{case_id}.nii.gz", values.astype(np.float32), geometry.ras_affine())
    argv = ["--exec_mode", "predict", "--ckpt_path", str(one_channel_checkpoint), "--num_workers", "2"]
    assert main.main([*argv, "--input", str(tmp_path / "nifti"), "--results", str(tmp_path / "a"), "--save_preds"]) == 0
    assert main.main([*argv, "--input", str(tmp_path / "dicom"), "--results", str(tmp_path / "b"),
                      "--output_format", "both"]) == 0
    for case_id, geometry in geometries.items():
        expected = nib.load(str(tmp_path / "a" / "predictions" / f"{case_id}.nii.gz"))
        reference = np.asanyarray(expected.dataobj)
        assert reference.max() > 0
        written = nib.load(str(tmp_path / "b" / "predictions" / f"{case_id}.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), reference)
        np.testing.assert_allclose(written.affine, geometry.ras_affine(), atol=1e-4)
        _, labels = seg_labels(tmp_path / "b" / "predictions" / f"{case_id}.dcm",
                               source_frames(tmp_path / "dicom" / case_id, "CT"))
        np.testing.assert_array_equal(labels, reference)


def test_an_empty_prediction_is_a_seg_of_empty_frames_and_other_grids_are_refused(tmp_path):
    from data_preprocessing.dicom import dicom_cases, dicom_meta
    from nnunet.dicom_seg import write_dicom_seg

    files = write_dicom_series(tmp_path / "in" / "ct", np.zeros((6, 5, 4), np.float32), DicomGeometry.oblique())
    (case,) = dicom_cases(tmp_path / "in", 1)
    meta = {"dicom": dicom_meta(case)}
    path = write_dicom_seg(tmp_path / "out", case.case_id, np.zeros((6, 5, 4), np.uint8), meta, ["organ", "lesion"])
    assert path == tmp_path / "out" / "ct.dcm"
    _, labels = seg_labels(path, [pydicom.dcmread(f, stop_before_pixels=True) for f in files])
    assert labels.shape == (6, 5, 4) and not labels.any()
    with pytest.raises(ValueError, match=r"ct: labels of shape \(4, 6, 5\) \(slices, rows, columns\) do not fit"):
        write_dicom_seg(tmp_path / "out", case.case_id, np.zeros((5, 6, 4), np.uint8), meta, ["organ"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct.dcm"]
