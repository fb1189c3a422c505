"""benchmarks/large_scan.py at a tiny size with ours and MONAI: figures, comparisons, predictions on the source grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks import large_scan

SHAPE, SMALL = [48, 48, 40], [40, 40, 32]


def test_ct_volume_has_air_tissue_and_two_organs() -> None:
    image, label = large_scan.ct_volume([40, 36, 30], seed=0, slab=7)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == label.shape == (40, 36, 30)
    assert set(np.unique(label)) == {0, 1, 2}
    assert np.median(image[0]) < -900  # the border is air
    assert 30 < np.median(image[label == 1]) < 90 and 120 < np.median(image[label == 2]) < 180


def test_tiny_run_with_monai(tmp_path: Path, capsys) -> None:
    output = tmp_path / "results.json"
    report = large_scan.main(["--shape", *map(str, SHAPE), "--small_shape", *map(str, SMALL), "--cases", "2",
                              "--tta", "off", "--peers", "before", "monai", "--train_cases", "2",
                              "--train_shape", "40", "40", "32", "--scratch", str(tmp_path / "scratch"),
                              "--output", str(output)])
    runs = {(run["tool"], run["setting"]): run for run in report["runs"]}
    large, many = "48x48x40, tta off", "2 x 40x40x32"
    assert set(runs) == {(tool, setting) for tool in ("ours", "before", "monai") for setting in (large, many)}
    for tool in ("ours", "monai"):
        for setting in (large, many):
            assert runs[(tool, setting)]["seconds"] > 0 and runs[(tool, setting)]["peak_mib"] > 50
    assert runs[("before", large)]["seconds"] is None and "--before" in runs[("before", large)]["note"]
    # Ours over the 2 cases also reports each case's prediction step, a part of the command's time.
    steps = runs[("ours", many)]["step_seconds"]
    assert len(steps) == 2 and 0 < sum(steps) < runs[("ours", many)]["seconds"]
    monai = [c for c in report["comparisons"] if c["peer"] == "MONAI"]
    assert {(c["stage"], c["measure"]) for c in monai} == {(s, m) for s in (large, many) for m in ("wall s",
                                                                                                     "peak MiB")}
    assert all(c["ratio_median"] > 0 for c in monai)
    assert json.loads(output.read_text())["comparisons"] == report["comparisons"]
    out = capsys.readouterr().out
    assert "ours better by" in out and "skipped" in out and "no resampling" in out

    # Labels on the scan's grid, and the same network through both pipelines gives the same labels.
    scratch = tmp_path / "scratch" / "out"
    ours = nib.load(scratch / "ours_48x48x40_ttaoff" / "predictions" / "scan_000.nii.gz")
    theirs = nib.load(scratch / "monai_48x48x40_ttaoff" / "scan_000.nii.gz")
    source = nib.load(tmp_path / "scratch" / "large" / "scan_000.nii.gz")
    assert ours.shape == theirs.shape == tuple(SHAPE)
    assert np.allclose(ours.affine, source.affine) and np.allclose(theirs.affine, source.affine)
    agreement = np.mean(np.asanyarray(ours.dataobj) == np.asanyarray(theirs.dataobj))
    assert agreement > 0.99
    for case in ("case_000", "case_001"):
        assert nib.load(scratch / "monai_2x40x40x32" / f"{case}.nii.gz").shape == tuple(SMALL)


@pytest.mark.parametrize("flag, value", [("--tta", "sometimes"), ("--peers", "everyone")])
def test_unknown_choices_are_refused(capsys, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as stop:
        large_scan.parse_args([flag, value])
    assert stop.value.code == 2 and flag in capsys.readouterr().err
