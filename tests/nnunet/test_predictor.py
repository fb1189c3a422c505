"""Prediction with a model package: the fold ensemble from the command line and from Python, uncertainty maps,
and one-line errors for bad packages and flags."""

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import main
from nnunet.predictor import Predictor


def package_argv(package, raw, results, *extra):
    return ["--exec_mode", "predict", "--model", str(package), "--input", str(raw), "--results", str(results),
            *extra]


def probabilities(results, case_id):
    return np.load(results / "predictions" / f"{case_id}_probs.npz")["probabilities"].astype(np.float32)


@pytest.fixture(scope="module")
def ensemble_runs(model_package, synthetic_task, tmp_path_factory):
    """Results of --folds 0, --folds 1 and both folds (with uncertainty maps) on the raw test images."""
    raw = synthetic_task.task_dir / "imagesTs"
    root = tmp_path_factory.mktemp("ensemble")
    for name, extra in (("fold0", ["--folds", "0"]), ("fold1", ["--folds", "1"]), ("both", ["--save_uncertainty"])):
        assert main.main(package_argv(model_package, raw, root / name, "--save_probs", *extra)) == 0
    return root


def test_the_ensemble_is_the_mean_of_its_folds_on_the_source_grid(ensemble_runs, synthetic_task):
    sources = sorted((synthetic_task.task_dir / "imagesTs").glob("*.nii.gz"))
    assert len(sources) == 2
    folds_differ = False
    for source_path in sources:
        case_id = source_path.name[: -len(".nii.gz")]
        source = nib.load(str(source_path))
        written = nib.load(str(ensemble_runs / "both" / "predictions" / source_path.name))
        assert written.shape == source.shape[:3] and written.get_data_dtype() == np.uint8
        np.testing.assert_allclose(written.affine, source.affine)
        first, second = probabilities(ensemble_runs / "fold0", case_id), probabilities(ensemble_runs / "fold1", case_id)
        both = probabilities(ensemble_runs / "both", case_id)
        assert both.shape == (4, *source.shape[:3])
        folds_differ |= float(np.abs(first - second).max()) > 1e-2
        # Each file is rounded to float16 (relative error 2^-11 of values up to 1).
        np.testing.assert_allclose(both, (first + second) / 2, atol=2e-3)
        # The package's postprocessing keeps one foreground component.
        labels = np.asanyarray(written.dataobj)
        assert ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))[1] <= 1
    assert folds_differ, "the two checkpoints should predict differently"


def test_uncertainty_maps_have_the_source_shape_and_their_ranges(ensemble_runs, synthetic_task):
    for source_path in sorted((synthetic_task.task_dir / "imagesTs").glob("*.nii.gz")):
        case_id = source_path.name[: -len(".nii.gz")]
        shape = nib.load(str(source_path)).shape[:3]
        folder = ensemble_runs / "both" / "predictions"
        entropy = nib.load(str(folder / f"{case_id}_entropy.nii.gz"))
        disagreement = nib.load(str(folder / f"{case_id}_disagreement.nii.gz"))
        assert entropy.shape == disagreement.shape == shape
        entropy, disagreement = np.asanyarray(entropy.dataobj), np.asanyarray(disagreement.dataobj)
        assert entropy.dtype == disagreement.dtype == np.float32
        assert entropy.min() >= 0 and entropy.max() <= math.log(4) + 1e-3 and entropy.max() > 0
        # Two members: each voxel has 0, 1 or 2 dissenting members.
        assert set(np.unique(disagreement)) <= {0.0, 0.5, 1.0}
        assert not (folder / f"{case_id}_disagreement.nii.gz").with_name(f"{case_id}_overlay.png").exists()
    assert not list((ensemble_runs / "fold0" / "predictions").glob("*_entropy.nii.gz"))


def test_python_api_predicts_files_and_arrays_as_the_command_line(ensemble_runs, model_package, synthetic_task):
    predictor = Predictor.from_package(model_package)
    raw = synthetic_task.task_dir / "imagesTs"
    files = sorted(raw.glob("*.nii.gz"))
    predictions = list(predictor.predict([str(path) for path in files], probabilities=True))
    assert [p.case_id for p in predictions] == [path.name[: -len(".nii.gz")] for path in files]
    for path, prediction in zip(files, predictions):
        expected = np.asanyarray(nib.load(str(ensemble_runs / "both" / "predictions" / path.name)).dataobj)
        np.testing.assert_array_equal(prediction.labels, expected)
        np.testing.assert_array_equal(prediction.probabilities.astype(np.float32),
                                      probabilities(ensemble_runs / "both", prediction.case_id))
    # An array in memory, channels first, with its affine: the same preprocessing and the same labels.
    source = nib.load(str(files[0]))
    image = np.moveaxis(source.get_fdata(dtype=np.float32), -1, 0)
    from_array = predictor.predict_array(image, source.affine, uncertainty=True)
    np.testing.assert_array_equal(from_array.labels, predictions[0].labels)
    assert from_array.entropy.shape == from_array.disagreement.shape == source.shape[:3]


def one_line_error(capsys, argv):
    assert main.main(argv) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: ")
    return message


def test_bad_packages_and_flags_are_one_line_errors_that_write_nothing(model_package, synthetic_task, trained,
                                                                       tmp_path, capsys):
    raw = synthetic_task.task_dir / "imagesTs"
    results = tmp_path / "out"

    def check(package, *extra):
        message = one_line_error(capsys, package_argv(package, raw, results, *extra))
        assert not (results / "predictions").exists()
        return message

    assert "--folds 3" in check(model_package, "--folds", "0", "3")
    assert "--ckpt_path" in check(model_package, "--ckpt_path", str(trained / "checkpoints" / "best.ckpt"))
    message = one_line_error(capsys, ["--exec_mode", "predict", "--model", str(model_package), "--results",
                                      str(results)])
    assert "--model needs --input" in message
    assert "--save_uncertainty needs --model" in one_line_error(
        capsys, ["--exec_mode", "predict", "--input", str(raw), "--save_uncertainty", "--results", str(results)])

    missing = shutil.copytree(model_package, tmp_path / "missing")
    (missing / "3d" / "fold_1.ckpt").unlink()
    assert "fold 1" in check(missing) and "missing" in check(missing)

    other_plan = shutil.copytree(model_package, tmp_path / "other_plan")
    plan = json.loads((other_plan / "3d" / "plan.json").read_text())
    plan["spacing"] = [2 * value for value in plan["spacing"]]
    (other_plan / "3d" / "plan.json").write_text(json.dumps(plan))
    message = check(other_plan)
    assert "fold 0 of configuration 3d" in message and "another plan" in message and "spacing" in message

    mixed = shutil.copytree(model_package, tmp_path / "mixed")
    description = json.loads((mixed / "package.json").read_text())
    description["labels"] = {"0": "background", "1": "tumour"}
    (mixed / "package.json").write_text(json.dumps(description))
    assert "labels" in check(mixed)


def test_configurations_each_preprocess_the_original_image(trained, synthetic_task, tmp_path, monkeypatch):
    """Two configurations predict an image without zero voxels at the plan's spacing (a crop of the whole image,
    which preprocessing normalises in place): each configuration's preprocessing sees the original image."""
    from nnunet import predictor as module
    from nnunet.checkpoints import read_checkpoint, stored_settings
    from nnunet.package import Postprocessing, write_package

    best = trained / "checkpoints" / "best.ckpt"
    config, _, _ = stored_settings(read_checkpoint(best), best)
    package = write_package(tmp_path / "package", config["task"], config["task_name"], config["labels"], None,
                            {"3d": (config, {0: best}), "again": (config, {0: best})}, Postprocessing(), {}, "test",
                            zip_it=False)
    seen = []
    real = module.preprocess_arrays

    def recording(loaded, plan, training):
        seen.append(loaded.image.copy())
        return real(loaded, plan, training)

    monkeypatch.setattr(module, "preprocess_arrays", recording)
    source = nib.load(str(sorted((synthetic_task.task_dir / "imagesTs").glob("*.nii.gz"))[0]))
    image = np.moveaxis(np.asanyarray(source.dataobj), -1, 0) + 5.0  # (C, X, Y, Z), no voxel at 0
    # At the plan's spacing: nothing to resample, so the crop is what gets normalised.
    Predictor.from_package(package).predict_array(image, spacing=config["spacing"][::-1])
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], seen[0])
