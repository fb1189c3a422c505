"""main.py --exec_mode predict: NIfTI in the source geometry, probabilities, overlays, raw input folders."""

import shutil

import nibabel as nib
import numpy as np
import pytest

import main


def predict_argv(trained, results, *extra):
    return ["--exec_mode", "predict", "--results", str(results), "--num_workers", "2",
            "--ckpt_path", str(trained / "checkpoints" / "best.ckpt"), *extra]


def test_predictions_land_on_the_source_grid(trained, synthetic_task, tmp_path):
    argv = predict_argv(trained, tmp_path, "--data", str(synthetic_task.preprocessed(3)), "--save_preds",
                        "--save_probs", "--overlay", "--tta")
    assert main.main(argv) == 0
    sources = sorted((synthetic_task.task_dir / "imagesTs").glob("*.nii.gz"))
    assert len(sources) == 2
    for source_path in sources:
        case_id = source_path.name[: -len(".nii.gz")]
        written = nib.load(str(tmp_path / "predictions" / f"{case_id}.nii.gz"))
        source = nib.load(str(source_path))
        assert written.shape == source.shape[:3]
        np.testing.assert_allclose(written.affine, source.affine)
        labels = np.asanyarray(written.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
        probabilities = np.load(tmp_path / "predictions" / f"{case_id}_probs.npz")["probabilities"]
        assert probabilities.shape == (4, *source.shape[:3])
        # float16 rounding may flip near-ties between classes
        assert (probabilities.astype(np.float32).argmax(0) == labels).mean() > 0.99
        assert (tmp_path / "predictions" / f"{case_id}_overlay.png").read_bytes()[:4] == b"\x89PNG"


def test_raw_input_is_preprocessed_on_the_fly_like_preprocess_py(trained, synthetic_task, tmp_path):
    assert main.main(predict_argv(trained, tmp_path / "a", "--data", str(synthetic_task.preprocessed(3)),
                                  "--save_preds")) == 0
    raw = synthetic_task.task_dir / "imagesTs"
    assert main.main(predict_argv(trained, tmp_path / "b", "--input", str(raw), "--save_preds")) == 0
    # The same images as one file per channel, named as nnU-Net v2 does.
    split = tmp_path / "split"
    split.mkdir()
    for path in raw.glob("*.nii.gz"):
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        for channel in range(data.shape[3]):
            nib.save(nib.Nifti1Image(data[..., channel], image.affine),
                     str(split / f"{path.name[:-7]}_{channel:04d}.nii.gz"))
    assert main.main(predict_argv(trained, tmp_path / "c", "--input", str(split), "--save_preds")) == 0
    for path in raw.glob("*.nii.gz"):
        expected = np.asanyarray(nib.load(str(tmp_path / "a" / "predictions" / path.name)).dataobj)
        for other in ("b", "c"):
            np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / other / "predictions" /
                                                                     path.name)).dataobj), expected)


def test_without_save_flags_nothing_is_written(trained, synthetic_task, tmp_path, capsys):
    assert main.main(predict_argv(trained, tmp_path, "--data", str(synthetic_task.preprocessed(3)))) == 0
    assert "nothing written" in capsys.readouterr().out
    assert not (tmp_path / "predictions").exists()


@pytest.mark.parametrize("problem, message", [
    ("one channel", "has 1 channel(s) but the task declares 2"),
    ("no checkpoint", "needs --ckpt_path"),
    ("empty folder", "holds no NIfTI images and no DICOM series"),
])
def test_bad_prediction_inputs(trained, synthetic_task, tmp_path, capsys, problem, message):
    folder = tmp_path / "input"
    folder.mkdir()
    if problem == "one channel":
        source = next((synthetic_task.task_dir / "imagesTs").glob("*.nii.gz"))
        image = nib.load(str(source))
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[..., 0], image.affine), str(folder / "single.nii.gz"))
    argv = predict_argv(trained, tmp_path / "out", "--input", str(folder), "--save_preds")
    if problem == "no checkpoint":
        argv = argv[: argv.index("--ckpt_path")] + argv[argv.index("--ckpt_path") + 2:]
    assert main.main(argv) == 1
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("predictions/*.nii.gz"))


def test_predicting_with_the_checkpoint_of_another_task_is_refused(trained, synthetic_task, tmp_path, capsys):
    data = tmp_path / "00_3d"
    shutil.copytree(synthetic_task.preprocessed(3), data)
    config = (data / "config.json").read_text().replace('"in_channels": 2', '"in_channels": 3')
    (data / "config.json").write_text(config)
    assert main.main(predict_argv(trained, tmp_path / "out", "--data", str(data), "--save_preds")) == 1
    assert "trained for 2 input channels but the data at --data has 3" in capsys.readouterr().err


def test_a_val_folder_is_narrowed_to_the_fold(trained, synthetic_task, tmp_path):
    from data_preprocessing.preprocessor import preprocess_task

    data = tmp_path / "data"
    shutil.copytree(synthetic_task.data, data)
    preprocess_task(synthetic_task.raw, data, "00", dim=3, exec_mode="val")
    assert len(list((data / "00_3d" / "val").glob("*_x.npy"))) == 8
    argv = predict_argv(trained, tmp_path / "out", "--data", str(data / "00_3d" / "val"), "--fold", "1",
                        "--nfolds", "4", "--save_preds")
    assert main.main(argv) == 0
    predicted = sorted(p.name[:-7] for p in (tmp_path / "out" / "predictions").glob("*.nii.gz"))
    from data_loading.data_module import split_cases

    training = sorted(p.name[:-6] for p in (data / "00_3d").glob("*_x.npy"))
    assert predicted == sorted(split_cases(training, 4, 1)[1]) and len(predicted) == 2


@pytest.mark.parametrize("source", ["raw", "preprocessed"])
def test_a_case_too_large_for_the_memory_left_is_skipped(trained, synthetic_task, tmp_path, capsys, monkeypatch,
                                                         source):
    """With memory for the smaller test case only, the larger one is reported in one line and skipped, the smaller
    one predicted and written, and the exit code says that a case failed."""
    import json
    from types import SimpleNamespace

    from nnunet import inference
    from nnunet.checkpoints import model_from_checkpoint

    patch = model_from_checkpoint(trained / "checkpoints" / "best.ckpt").patch_size
    folder = synthetic_task.preprocessed(3) / "test"
    shapes = {path.name[:-len("_meta.json")]: json.loads(path.read_text())["shape"]
              for path in folder.glob("*_meta.json")}
    small, large = sorted(shapes, key=lambda case: np.prod(shapes[case]))
    assert np.prod(shapes[small]) < np.prod(shapes[large])
    needs = {case: sum(inference.case_footprint(shape, 4, patch, 4, False)) for case, shape in shapes.items()}
    free = (needs[small] + needs[large]) // 2
    monkeypatch.setattr(inference.psutil, "virtual_memory", lambda: SimpleNamespace(available=free))
    where = ["--input", str(synthetic_task.task_dir / "imagesTs")] if source == "raw" else \
        ["--data", str(synthetic_task.preprocessed(3))]
    assert main.main(predict_argv(trained, tmp_path, *where, "--save_preds")) == 1
    err = capsys.readouterr().err
    assert f"{large}: predicting it needs about" in err and "GB are free" in err
    assert f"1 of 2 case(s) not predicted (see above): {large}" in err
    assert sorted(path.name for path in (tmp_path / "predictions").iterdir()) == [f"{small}.nii.gz"]
