"""benchmarks/run_all.py on tiny settings, without nnU-Net v2: every stage runs, the peer is skipped with a note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run_all

TINY = ["--cases", "2", "--size", "32", "--n_jobs", "1", "--repeats", "1", "--filters", "4", "8", "16", "32",
        "--steps", "1", "--warmup", "1", "--loader_batches", "2", "--loader_warmup", "1", "--num_workers", "1",
        "--volume_shape", "40", "60", "40"]


@pytest.fixture(autouse=True)
def no_peer(monkeypatch) -> None:
    monkeypatch.delenv("NNUNET_PYTHON", raising=False)


@pytest.mark.parametrize("stage, compared", [
    ("preprocess", {("wall s", "nnU-Net v2"), ("peak MiB", "nnU-Net v2")}),
    ("loader", {("patches/s", "MONAI transforms")}),
    ("train", {("step ms", "MONAI (plain PyTorch)"), ("step ms", "nnU-Net v2")}),
    ("predict", {("s / case", "MONAI (plain PyTorch)"), ("s / case", "nnU-Net v2")}),
])
def test_each_stage_runs_with_the_peer_missing(tmp_path: Path, capsys, stage: str, compared: set) -> None:
    output = tmp_path / "results.json"
    comparisons = run_all.main([*TINY, "--stages", stage, "--scratch", str(tmp_path / "scratch"),
                                "--output", str(output)])
    assert {(c.measure, c.peer) for c in comparisons} == compared
    for comparison in comparisons:
        assert len(comparison.ours) == 1 and comparison.ours[0] > 0
        if comparison.peer == "nnU-Net v2":
            assert comparison.theirs == [] and "--nnunet_python" in comparison.note
        else:
            assert len(comparison.theirs) == 1 and len(comparison.ratios) == 1
    table = capsys.readouterr().out
    assert "ours better by" in table and "alternating rounds" in table
    if any(c.peer == "nnU-Net v2" for c in comparisons):
        assert "skipped" in table and "not installed here" in table
    saved = json.loads(output.read_text())
    assert [c["peer"] for c in saved["comparisons"]] == [c.peer for c in comparisons]


def test_the_scratch_folder_is_removed_unless_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_all.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "made"))
    run_all.main([*TINY, "--stages", "predict"])
    assert not (tmp_path / "made").exists()


@pytest.mark.parametrize("stage", ["train", "predict"])
def test_amp_runs_ours_and_monai_in_bf16(tmp_path: Path, stage: str) -> None:
    comparisons = run_all.main([*TINY, "--stages", stage, "--amp", "--scratch", str(tmp_path)])
    assert all(c.stage.endswith(", amp") for c in comparisons)
    monai = next(c for c in comparisons if c.peer.startswith("MONAI"))
    assert len(monai.ours) == len(monai.theirs) == 1 and monai.ratios[0] > 0
    if stage == "train":
        assert json.loads((tmp_path / "ours_train" / "perf.json").read_text())["amp"] is True


@pytest.mark.parametrize("flag", ["--warmup", "--loader_warmup"])
def test_a_negative_warmup_is_refused(capsys, flag: str) -> None:
    with pytest.raises(SystemExit) as stop:
        run_all.parse_args([flag, "-1"])
    assert stop.value.code == 2 and flag in capsys.readouterr().err
