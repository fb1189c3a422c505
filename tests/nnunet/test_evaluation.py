"""evaluate.py and nnunet.evaluation on tiny NIfTI folders, checked against NumPy counts."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import evaluate
from nnunet.evaluation import EvaluationError, evaluate_folder, read_dataset_labels
from nnunet.evaluation_output import write_results
from utils.io import WriteError

REPO = Path(__file__).resolve().parents[2]
SHAPE = (6, 7, 5)


def save(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0), affine: np.ndarray | None = None) -> Path:
    """Write a label map (X, Y, Z) as NIfTI with a diagonal affine of the given spacing (mm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = [-12.0, 4.0, 30.0]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def numpy_dice(pred: np.ndarray, label: np.ndarray, c: int) -> float:
    total = np.sum(pred == c) + np.sum(label == c)
    return 1.0 if total == 0 else 2.0 * np.sum((pred == c) & (label == c)) / total


def run_cli(*argv: str | Path, process: bool = False) -> subprocess.CompletedProcess:
    """evaluate.py with `argv`: in this process (fast), or with `process` as its own Python process."""
    if process:
        return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, argv)],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = evaluate.main([str(arg) for arg in argv])
    return subprocess.CompletedProcess(["evaluate.py", *map(str, argv)], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def task(tmp_path):
    """Three cases: class 3 only in case_b's label, class 2 absent from case_c, value 4 only predicted."""
    rng = np.random.default_rng(0)
    arrays = {}
    for case_id in ("case_a", "case_b", "case_c"):
        label = rng.integers(0, 3, size=SHAPE).astype(np.uint8)
        pred = np.where(rng.random(SHAPE) < 0.75, label, rng.integers(0, 3, size=SHAPE)).astype(np.uint8)
        arrays[case_id] = [pred, label]
    arrays["case_b"][1][0, 0, :3] = 3
    arrays["case_c"][0][arrays["case_c"][0] == 2] = 0
    arrays["case_c"][1][arrays["case_c"][1] == 2] = 1
    arrays["case_c"][0][5, 6, 4] = 4
    for case_id, (pred, label) in arrays.items():
        save(tmp_path / "preds" / f"{case_id}.nii.gz", pred)
        # Labels stored as float with whole values, as some MSD tasks do, are accepted.
        save(tmp_path / "labels" / f"{case_id}.nii.gz", label.astype(np.float32) if case_id == "case_a" else label)
    return tmp_path / "preds", tmp_path / "labels", arrays


def test_evaluate_folder_matches_numpy_counts(task):
    preds, labels, arrays = task
    results = evaluate_folder(preds, labels)
    assert results["classes"] == [1, 2, 3]
    assert results["prediction_only_labels"] == [4]
    assert [case["case_id"] for case in results["cases"]] == ["case_a", "case_b", "case_c"]
    expected = {case_id: [numpy_dice(pred, label, c) for c in (1, 2, 3)] for case_id, (pred, label) in arrays.items()}
    for case in results["cases"]:
        assert list(case["dice"].values()) == pytest.approx(expected[case["case_id"]])
    assert results["cases"][2]["dice"]["2"] == 1.0  # empty on empty
    assert results["cases"][0]["dice"]["3"] == 1.0
    class_means = np.mean(list(expected.values()), axis=0)
    assert list(results["mean"]["dice"].values()) == pytest.approx(class_means)
    assert results["mean_dice"] == pytest.approx(class_means.mean())
    assert "hd95" not in results["mean"]


def test_evaluate_folder_hd95_uses_header_spacing(tmp_path):
    # Class 1: parallel lines one voxel apart on x and two on y: sqrt((1 * 2.5)^2 + (2 * 0.8)^2) mm.
    # Class 2: only in the label -> inf. Class 3 (in case_b's label only) is absent from case_a -> 0.
    label = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    label[0, 0, :] = 1
    pred[1, 2, :] = 1
    label[4, 5, 1:3] = 2
    other = np.zeros(SHAPE, dtype=np.uint8)
    other[2, 2, 2] = 3
    spacing = (2.5, 0.8, 3.0)
    for folder, a, b in (("preds", pred, other), ("labels", label, other)):
        save(tmp_path / folder / "case_a.nii.gz", a, spacing)
        save(tmp_path / folder / "case_b.nii.gz", b, spacing)
    results = evaluate_folder(tmp_path / "preds", tmp_path / "labels", hd95=True)
    case_a = results["cases"][0]["hd95"]
    assert case_a["1"] == pytest.approx(math.sqrt(2.5**2 + 1.6**2), rel=1e-6)
    assert case_a["2"] == math.inf
    assert case_a["3"] == 0.0
    assert results["cases"][1]["hd95"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert results["mean"]["hd95"]["1"] == pytest.approx(math.sqrt(2.5**2 + 1.6**2) / 2, rel=1e-6)
    assert results["mean_hd95"] == math.inf


def test_cli_prints_table_and_writes_csv_and_json(task):
    preds, labels, arrays = task
    expected = evaluate_folder(preds, labels, hd95=True)
    completed = run_cli("--preds", preds, "--lbls", labels, "--hd95", process=True)  # the real entry point
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0] == "Dice"
    assert lines[1].split() == ["1", "2", "3", "mean"]
    case_b = next(line for line in lines if line.startswith("case_b")).split()
    assert [float(v) for v in case_b[1:4]] == pytest.approx(list(expected["cases"][1]["dice"].values()), abs=5e-5)
    assert "HD95 (mm)" in lines
    assert sum(line.startswith("MEAN") for line in lines) == 2
    assert "note: predictions hold label 4, which no label file has" in lines

    with open(preds / "evaluation.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["case_id", "dice_1", "dice_2", "dice_3", "dice_mean", "hd95_1", "hd95_2", "hd95_3", "hd95_mean",
                       "hd95_mode"]
    assert [row[0] for row in rows[1:]] == ["case_a", "case_b", "case_c", "MEAN"]
    for row, (pred, label), case in zip(rows[1:], arrays.values(), expected["cases"]):
        dice = [numpy_dice(pred, label, c) for c in (1, 2, 3)]
        assert [float(v) for v in row[1:5]] == pytest.approx([*dice, np.mean(dice)])
        assert [float(v) for v in row[5:8]] == pytest.approx(list(case["hd95"].values()))
    assert float(rows[-1][4]) == pytest.approx(expected["mean_dice"])

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    saved = json.loads((preds / "evaluation.json").read_text(), parse_constant=refuse)
    assert saved["classes"] == [1, 2, 3]
    assert saved["mean_dice"] == pytest.approx(expected["mean_dice"])
    assert saved["cases"][1]["dice"] == pytest.approx(expected["cases"][1]["dice"])
    assert sorted(p.name for p in preds.iterdir() if not p.name.endswith(".nii.gz")) == [
        "evaluation.csv", "evaluation.json"]


def test_cli_infinite_hd95_is_null_in_json_and_inf_in_csv(tmp_path):
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:3, 1:3, 1:3] = 1
    save(tmp_path / "preds" / "case_a.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    save(tmp_path / "labels" / "case_a.nii.gz", label)
    completed = run_cli("--preds", tmp_path / "preds", "--lbls", tmp_path / "labels", "--hd95")
    assert completed.returncode == 0, completed.stderr
    saved = json.loads((tmp_path / "preds" / "evaluation.json").read_text())
    assert saved["cases"][0] == {"case_id": "case_a", "dice": {"1": 0.0}, "hd95": {"1": None}}
    assert saved["mean_hd95"] is None
    rows = list(csv.reader((tmp_path / "preds" / "evaluation.csv").read_text().splitlines()))
    assert rows[1] == ["case_a", "0.0", "0.0", "inf", "inf", "max"]


def test_cli_output_prefix_and_uncompressed_nifti(tmp_path):
    label = np.zeros(SHAPE, dtype=np.int16)
    label[2:4, 2:5, 1:4] = 1
    pred = np.zeros_like(label)
    pred[2:4, 2:5, 2:4] = 1
    save(tmp_path / "preds" / "case_a.nii", pred)
    save(tmp_path / "labels" / "case_a.nii", label)
    prefix = tmp_path / "reports" / "fold0"
    completed = run_cli("--preds", tmp_path / "preds", "--lbls", tmp_path / "labels", "--output", prefix)
    assert completed.returncode == 0, completed.stderr
    saved = json.loads(prefix.with_suffix(".json").read_text())
    assert saved["cases"][0]["dice"]["1"] == pytest.approx(numpy_dice(pred, label, 1))
    assert prefix.with_suffix(".csv").is_file()
    assert not (tmp_path / "preds" / "evaluation.json").exists()


def test_cli_dataset_json_names_and_lists_the_classes(task, tmp_path):
    preds, labels, arrays = task
    dataset_json = tmp_path / "dataset.json"
    names = {"0": "background", "1": "liver", "2": "tumour", "3": "vessel", "4": "cyst", "5": "kidney"}
    dataset_json.write_text(json.dumps({"name": "toy", "labels": names}))
    completed = run_cli("--preds", preds, "--lbls", labels, "--dataset_json", dataset_json)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[1].split() == ["liver", "tumour", "vessel", "cyst", "kidney", "mean"]
    saved = json.loads((preds / "evaluation.json").read_text())
    assert saved["classes"] == [1, 2, 3, 4, 5]
    assert saved["class_names"]["2"] == "tumour"
    assert saved["prediction_only_labels"] == []
    # kidney (5) is in no file: empty on empty in every case. cyst (4) is only predicted, in case_c.
    assert [case["dice"]["5"] for case in saved["cases"]] == [1.0, 1.0, 1.0]
    assert [case["dice"]["4"] for case in saved["cases"]] == [1.0, 1.0, 0.0]
    pred, label = arrays["case_a"]
    assert saved["cases"][0]["dice"]["1"] == pytest.approx(numpy_dice(pred, label, 1))


def test_read_dataset_labels_formats(tmp_path):
    msd = tmp_path / "msd.json"
    msd.write_text(json.dumps({"labels": {"0": "background", "2": "tumour", "1": "liver"}}))
    assert read_dataset_labels(msd) == {0: "background", 1: "liver", 2: "tumour"}
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    assert read_dataset_labels(v2) == {0: "background", 1: "liver", 2: "tumour"}
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"labels": {"background": 0, "whole tumour": [1, 2, 3]}}))
    with pytest.raises(EvaluationError, match="region labels"):
        read_dataset_labels(regions)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(EvaluationError, match="broken.json"):
        read_dataset_labels(broken)


def test_write_results_leaves_nothing_when_it_cannot_write(task, tmp_path):
    preds, labels, _ = task
    results = evaluate_folder(preds, labels)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(WriteError, match="cannot write"):
        write_results(results, blocker / "evaluation")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "labels", "preds"]


def make_defect(root: Path, defect: str) -> list[str]:
    """Folders under root with one defect; returns the extra command-line arguments it needs."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:4, 2:5, 1:3] = 1
    preds, labels = root / "preds", root / "labels"
    preds.mkdir()
    labels.mkdir()
    if defect == "no_cases":
        return []
    save(labels / "case_a.nii.gz", label)
    save(labels / "case_b.nii.gz", label)
    save(preds / "case_a.nii.gz", label)
    if defect != "missing_prediction":
        save(preds / "case_b.nii.gz", label)
    if defect == "extra_prediction":
        save(preds / "case_z.nii.gz", label)
    elif defect == "shape":
        save(preds / "case_b.nii.gz", np.zeros((6, 7, 4), dtype=np.uint8))
    elif defect == "affine":
        shifted = np.diag([1.0, 1.0, 1.0, 1.0])
        shifted[:3, 3] = [-12.0, 4.0, 35.0]
        save(preds / "case_b.nii.gz", label, affine=shifted)
    elif defect == "corrupt":
        (preds / "case_b.nii.gz").write_bytes(b"not a NIfTI file at all")
    elif defect == "truncated":
        data = (preds / "case_b.nii.gz").read_bytes()
        (preds / "case_b.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:400]))
    elif defect == "fractional":
        save(preds / "case_b.nii.gz", label.astype(np.float32) * 0.5)
    elif defect == "outside_dataset":
        (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
        save(preds / "case_b.nii.gz", label * 2)
        return ["--dataset_json", str(root / "dataset.json")]
    return []


@pytest.mark.parametrize(
    "defect, fragments",
    [
        ("missing_prediction", ["no prediction in", "1 case (case_b)", "add --predicted_only"]),
        ("extra_prediction", ["without a label", "case_z"]),
        ("no_cases", ["no cases to evaluate", "labels"]),
        ("shape", ["case_b", "(6, 7, 4)", "(6, 7, 5)"]),
        ("affine", ["case_b", "affine"]),
        ("corrupt", ["cannot read prediction", "case_b.nii.gz"]),
        ("truncated", ["cannot read prediction", "case_b.nii.gz"]),
        ("fractional", ["case_b.nii.gz", "non-integer values such as 0.5"]),
        ("outside_dataset", ["case_b", "label 2", "classes (1)"]),
    ],
)
def test_cli_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, defect, fragments):
    extra = make_defect(tmp_path, defect)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    completed = run_cli("--preds", tmp_path / "preds", "--lbls", tmp_path / "labels", "--hd95", *extra)
    assert completed.returncode == 1
    assert completed.stdout == ""
    message = completed.stderr.strip()
    assert "\n" not in message and message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_evaluate_folder_refuses_background_only_labels_and_duplicate_cases(tmp_path):
    empty = np.zeros(SHAPE, dtype=np.uint8)
    save(tmp_path / "preds" / "case_a.nii.gz", empty)
    save(tmp_path / "labels" / "case_a.nii.gz", empty)
    with pytest.raises(EvaluationError, match="only background"):
        evaluate_folder(tmp_path / "preds", tmp_path / "labels")
    # With the classes named, background-only cases are valid: every class is empty on empty.
    results = evaluate_folder(tmp_path / "preds", tmp_path / "labels", class_names={0: "background", 1: "liver"})
    assert results["cases"][0]["dice"] == {"1": 1.0}
    save(tmp_path / "preds" / "case_a.nii", empty)
    with pytest.raises(EvaluationError, match="case_a twice"):
        evaluate_folder(tmp_path / "preds", tmp_path / "labels")


def test_predicted_only_scores_the_cases_that_have_a_prediction(task):
    preds, labels, _ = task
    (preds / "case_c.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="no prediction"):
        evaluate_folder(preds, labels)
    results = evaluate_folder(preds, labels, predicted_only=True)
    assert [case["case_id"] for case in results["cases"]] == ["case_a", "case_b"]
    # The same through evaluate.py's flag.
    assert evaluate.main(["--preds", str(preds), "--lbls", str(labels)]) == 1
    assert evaluate.main(["--preds", str(preds), "--lbls", str(labels), "--predicted_only"]) == 0
    written = json.loads((preds / "evaluation.json").read_text())
    assert [case["case_id"] for case in written["cases"]] == ["case_a", "case_b"]
    for path in preds.glob("*.nii.gz"):
        path.unlink()
    with pytest.raises(EvaluationError, match="none of the predictions"):
        evaluate_folder(preds, labels, predicted_only=True)
