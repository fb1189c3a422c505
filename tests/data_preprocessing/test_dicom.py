"""DICOM input: series found and grouped into cases, checked from their headers, read into a NIfTI image's geometry."""

import shutil

import numpy as np
import pydicom
import pytest

from data_preprocessing.dicom import dicom_cases, raw_cases, read_dicom_case
from data_preprocessing.layouts import PreprocessingError
from data_preprocessing.reading import case_meta, load_case
from tests.factories import DicomGeometry, dicom_stored, save_nifti, write_dicom_series

SHAPE = (10, 8, 6)  # (columns, rows, slices)


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 300, SHAPE).astype(np.float32)


@pytest.mark.parametrize("geometry", [
    DicomGeometry(pixel_spacing=(0.8, 0.7), slice_step=2.5),
    DicomGeometry.oblique(30.0, origin=(5.0, -3.0, 12.0), pixel_spacing=(1.2, 0.9), slice_step=1.25),
    # Slices listed from head to feet: the normal of a coronal plane, rows along -z.
    DicomGeometry(row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 0.0, -1.0)),
], ids=["axial", "oblique", "coronal"])
def test_the_reader_gives_the_affine_of_the_positions_and_the_rescaled_values(tmp_path, geometry):
    source = volume()
    files = write_dicom_series(tmp_path / "series", source, geometry, slope=0.5, intercept=-1024.0)
    (case,) = dicom_cases(tmp_path, 1)
    nifti, data = read_dicom_case(case)
    assert data.shape == SHAPE and data.dtype == np.float32
    np.testing.assert_array_equal(data, dicom_stored(source, 0.5, -1024.0) * 0.5 - 1024.0)
    np.testing.assert_allclose(nifti.affine, geometry.ras_affine(), atol=1e-5)
    # Each voxel lands where its slice's header places it: DICOM (LPS) position = affine (RAS) with x, y negated.
    for index, path in enumerate(files):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        row, column = 3, 7
        lps = (np.array(header.ImagePositionPatient, dtype=float)
               + column * float(header.PixelSpacing[1]) * np.array(header.ImageOrientationPatient[:3], dtype=float)
               + row * float(header.PixelSpacing[0]) * np.array(header.ImageOrientationPatient[3:], dtype=float))
        ras = nifti.affine @ [column, row, index, 1]
        np.testing.assert_allclose(ras[:3] * [-1, -1, 1], lps, atol=1e-4)
    assert list(case.dicom[0]) == [str(path.resolve()) for path in files]


def test_loading_a_dicom_case_gives_the_metadata_a_segmentation_needs(tmp_path):
    files = write_dicom_series(tmp_path / "scan", volume())
    (case,) = raw_cases(tmp_path, 1)
    loaded = load_case(tmp_path, case, 1, ())
    assert loaded.image.shape == (1, SHAPE[2], SHAPE[1], SHAPE[0])
    meta = case_meta(case, loaded, {})
    assert meta["dicom"]["files"] == [str(path.resolve()) for path in files]
    assert meta["dicom"]["series_instance_uids"] == [str(pydicom.dcmread(files[0]).SeriesInstanceUID)]
    assert meta["original_shape"] == list(SHAPE)


def test_case_ids_are_subfolders_or_series_numbers_and_descriptions(tmp_path):
    write_dicom_series(tmp_path / "a" / "patient 1", volume(), series_number=3, description="AX T1")
    write_dicom_series(tmp_path / "b", volume(), series_number=3, description="AX T1")
    mixed = tmp_path / "mixed"
    for seed, (number, description) in enumerate([(4, "Head/Neck"), (5, "Head/Neck"), (5, "Head/Neck")]):
        write_dicom_series(mixed, volume(), series_number=number, description=description, seed=seed + 1)
    ids = [case.case_id for case in dicom_cases(tmp_path, 1)]
    assert len(ids) == 5 and ids[0] == "4_Head_Neck" and ids[3:] == ["a_patient_1", "b"]
    assert ids[1].startswith("5_Head_Neck_") and ids[2].startswith("5_Head_Neck_") and ids[1] != ids[2]
    assert ids == [case.case_id for case in dicom_cases(tmp_path, 1)]  # deterministic


def write_study(folder, names, geometry=None, seed=0, patient_id="P1"):
    study_uid = pydicom.uid.generate_uid()
    for number, name in enumerate(names, start=1):
        write_dicom_series(folder / name.replace(" ", "_"), volume(seed + number), geometry, description=name,
                           series_number=number, study_uid=study_uid, seed=seed + number, patient_id=patient_id)


def test_channels_are_matched_per_study_by_series_description(tmp_path):
    write_study(tmp_path / "one", ["Localizer", "AX FLAIR", "AX T1", "AX T1 Gd"])
    write_study(tmp_path / "two", ["t1", "flair", "T1 gd"], seed=10)
    cases = dicom_cases(tmp_path, 2, ["FLAIR", "t1 gd"])
    assert [case.case_id for case in cases] == ["one", "two"]
    descriptions = [[str(pydicom.dcmread(files[0]).SeriesDescription) for files in case.dicom] for case in cases]
    assert descriptions == [["AX FLAIR", "AX T1 Gd"], ["flair", "T1 gd"]]
    # "t1" is contained in two descriptions of the second study; the exact one wins, in the first it is ambiguous.
    with pytest.raises(PreprocessingError, match=r"study .*: channel 't1' matches 2 series \('AX T1', 'AX T1 Gd'\)"):
        dicom_cases(tmp_path, 2, ["flair", "t1"])
    nifti, data = read_dicom_case(cases[1])
    assert data.shape == (*SHAPE, 2)


@pytest.mark.parametrize("problem, message", [
    ("no_series", r"holds no NIfTI images and no DICOM series"),
    ("mixed_geometry", r"series 1 'CT' \(.*\) mixes slice geometries: \w+ differs from \w+ in orientation, size or "
                       r"pixel spacing"),
    ("missing_slice", r"series 1 'CT' \(.*\) is missing slices: 3.000 mm between the slices at .* where the median "
                      r"step is 1.500 mm"),
    ("duplicate", r"has two slices at one position"),
    ("missing_channel", r"study .*: no series matches channel 'T2' \(descriptions: 'FLAIR', 'T1'\)"),
    ("channel_grids", r"series 2 'T1' \(.*\) does not share the grid of series 1 'FLAIR'"),
    ("channel_count", r"--dicom_channels names 1 series but the task has 2 channel\(s\)"),
    ("no_names", r"the task has 2 channels; name the series of each with --dicom_channels"),
])
def test_bad_dicom_input_is_one_line_naming_the_folder_and_series(tmp_path, problem, message):
    names, channels = [], 1
    if problem == "no_series":
        (tmp_path / "notes.txt").write_text("no images here")
    elif problem in ("mixed_geometry", "missing_slice", "duplicate"):
        files = write_dicom_series(tmp_path / "ct", volume())
        if problem == "mixed_geometry":
            header = pydicom.dcmread(files[2])
            header.PixelSpacing = ["0.5", "0.5"]
            header.save_as(files[2])
        elif problem == "missing_slice":
            files[3].unlink()
        else:
            shutil.copy(files[2], tmp_path / "ct" / "copy")
            header = pydicom.dcmread(files[2])
            header.SOPInstanceUID = pydicom.uid.generate_uid()
            header.save_as(tmp_path / "ct" / "copy")
    else:
        write_study(tmp_path / "study", ["FLAIR"])
        study_uid = str(pydicom.dcmread(next((tmp_path / "study" / "FLAIR").iterdir())).StudyInstanceUID)
        other = DicomGeometry(slice_step=2.0) if problem == "channel_grids" else None
        write_dicom_series(tmp_path / "study" / "T1", volume(), other, description="T1", series_number=2,
                           study_uid=study_uid)
        channels = 2
        names = {"missing_channel": ["FLAIR", "T2"], "channel_count": ["FLAIR"], "no_names": []}.get(problem,
                                                                                                 ["FLAIR", "T1"])
    with pytest.raises(PreprocessingError, match=message) as raised:
        dicom_cases(tmp_path, channels, names)
    assert "\n" not in str(raised.value) and str(tmp_path) in str(raised.value) or problem == "channel_count"


def test_only_the_series_of_the_cases_are_checked(tmp_path):
    write_study(tmp_path / "study", ["FLAIR", "T1"])
    localizer = write_dicom_series(tmp_path / "study" / "scout", volume(), description="Localizer",
                                   study_uid=str(pydicom.dcmread(next((tmp_path / "study" / "T1").iterdir()))
                                                 .StudyInstanceUID))
    localizer[2].unlink()  # a gap: this series alone would be refused
    assert [case.case_id for case in dicom_cases(tmp_path, 2, ["flair", "t1"])] == ["study"]
    with pytest.raises(PreprocessingError, match="series 1 'Localizer' .* is missing slices"):
        dicom_cases(tmp_path, 1)
    (case,) = dicom_cases(tmp_path, 1, ["T1"])  # one channel, picked by name
    assert case.case_id == "study_T1" and len(case.dicom) == 1


def test_nifti_folders_keep_their_listing_and_refuse_dicom_channels(tmp_path):
    save_nifti(tmp_path / "case_1.nii.gz", volume(), np.eye(4))
    assert [case.case_id for case in raw_cases(tmp_path, 1)] == ["case_1"]
    assert raw_cases(tmp_path, 1)[0].dicom is None
    with pytest.raises(PreprocessingError, match="--dicom_channels names DICOM series but .* holds NIfTI images"):
        raw_cases(tmp_path, 1, ["CT"])
