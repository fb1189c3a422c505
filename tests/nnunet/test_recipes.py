"""The reference recipes: MLPerf UNet3D on KiTS19 (log line, quality target, compliant log) and BraTS metric names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import main
import preprocess
from nnunet.mlperf import MLPerfReport, QualityThreshold, mlperf_metrics
from tests.conftest import module_from_argv
from tests.data_preprocessing.test_layouts import write_kits

ROOT = Path(__file__).resolve().parents[2]


def test_mlperf_record_and_top_values_follow_the_best_mean_dice():
    first = mlperf_metrics(20, {"dice": [0.9, 0.5], "dice_mean": 0.7, "val_loss": 0.4, "train_loss": 0.3})
    assert first == {"epoch": 20, "L1 dice": 0.9, "L2 dice": 0.5, "mean_dice": 0.7, "eval_loss": 0.4,
                     "train_loss": 0.3}
    report = MLPerfReport()
    assert report.update(first)["TOP_mean_dice"] == 0.7
    worse = mlperf_metrics(40, {"dice": [0.8, 0.4], "dice_mean": 0.6, "val_loss": 0.5, "train_loss": 0.2})
    values = report.update(worse)
    assert values["mean_dice"] == 0.6 and values["TOP_mean_dice"] == 0.7 and values["TOP_epoch"] == 20
    assert values["TOP_L2 dice"] == 0.5
    line = report.line(values)
    assert line.startswith("epoch 40  L1 dice 0.8000  L2 dice 0.4000  mean_dice 0.6000") and "TOP_epoch 20" in line
    restored = MLPerfReport()
    restored.load_state_dict(report.state_dict())
    assert restored.update(worse)["TOP_epoch"] == 20


def test_quality_threshold_stops_after_the_evaluation_that_reaches_it(capsys):
    callback = QualityThreshold(0.9)
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, current_epoch=4, is_global_zero=True)
    module = SimpleNamespace(epoch_metrics={"dice_mean": 0.85}, best_dice=0.85)
    callback.on_validation_end(trainer, module)
    assert not trainer.should_stop
    module.epoch_metrics = {}  # an epoch without evaluation
    callback.on_validation_end(trainer, module)
    assert not trainer.should_stop
    module.epoch_metrics, module.best_dice = {"dice_mean": 0.91}, 0.91
    callback.on_validation_end(trainer, module)
    assert trainer.should_stop and callback.reached_epoch == 4
    callback.on_fit_end(trainer, module)
    assert "quality threshold 0.9 reached: mean Dice 0.9100 after 5 epochs" in capsys.readouterr().out


def test_kits19_layout_through_the_mlperf_recipe(tmp_path, capsys):
    """KiTS19 cases -> preprocess --task kits19 -> scripts/train.py --recipe mlperf (shortened) -> its log line."""
    data = tmp_path / "kits19" / "data"
    # Cases 0, 3 and 5 are in the reference's evaluation split, 1, 2 and 4 train.
    write_kits(data, [0, 1, 2, 3, 4, 5])
    assert preprocess.main(["--task", "kits19", "--data", str(tmp_path), "--results", str(tmp_path / "out"),
                            "--n_jobs", "1"]) == 0
    task = tmp_path / "out" / "kits19_3d"
    assert json.loads((task / "splits.json").read_text())[0]["val"] == ["case_00000", "case_00003", "case_00005"]

    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    args, extra = train_script.parser().parse_known_args(["--data", str(task), "--results", str(tmp_path / "r"),
                                                          "--gpus", "0", "--recipe", "mlperf"])
    command = train_script.build_command(args, extra)
    for flag, value in (("--optimizer", "sgd"), ("--learning_rate", "0.8"), ("--momentum", "0.9"),
                        ("--warmup_start_lr", "1e-4"), ("--lr_warmup_epochs", "200"), ("--oversampling", "0.4"),
                        ("--quality_threshold", "0.908"), ("--eval_every", "20"), ("--negative_slope", "0")):
        assert command[command.index(flag) + 1] == value
    assert "--deep_supervision" not in command
    # The recipe, shortened: two epochs evaluated, a tiny network, a target it cannot reach.
    mlperf_log = tmp_path / "r" / "mlperf.log"
    shortened = ["--epochs", "2", "--eval_every", "1", "--skip_first_n_eval", "0", "--lr_warmup_epochs", "1",
                 "--train_batches", "1", "--filters", "4", "8", "16", "32", "--depth", "4", "--num_workers", "2",
                 "--seed", "0", "--quality_threshold", "1.0", "--mlperf_log", str(mlperf_log)]
    capsys.readouterr()
    assert main.main(command[2:] + shortened) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ") and "L1 dice" in line]
    assert [line.split()[1] for line in lines] == ["1", "2"]
    pattern = (r"epoch 2  L1 dice [\d.]+  L2 dice [\d.]+  mean_dice [\d.]+  eval_loss [\d.]+  train_loss [\d.]+  "
               r"TOP_epoch [12]  TOP_L1 dice [\d.]+  TOP_L2 dice [\d.]+  TOP_mean_dice [\d.]+")
    assert re.search(pattern, lines[1]), lines[1]
    assert "quality threshold 1.0 not reached" in out
    events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in mlperf_log.read_text().splitlines()
              if ":::MLLOG" in line]
    accuracy = [e for e in events if e["key"] == "eval_accuracy"]
    assert [e["metadata"]["epoch_num"] for e in accuracy] == [1, 2] and isinstance(accuracy[0]["value"], float)
    assert next(e for e in events if e["key"] == "run_stop")["metadata"]["status"] == "aborted"
    # The package's compliance checker (UNet3D training rules) finds nothing wrong but what a tiny run cannot
    # meet: the 168 training and 42 evaluation cases of KiTS19, and the 0.908 target.
    checked = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                              "--ruleset", "4.0.0", "--log_output", str(tmp_path / "compliance.log"),
                              str(mlperf_log)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    output = checked.stdout + checked.stderr
    failed = re.findall(r"CHECK for '(\w+)' failed|Failed checks for (\w+)|occurrence of '(\w+)' but found", output)
    assert {key for match in failed for key in match if key} == {"train_samples", "eval_samples", "eval_accuracy"}
    assert "v['value'] == 168" in output and "v['value'] >= 0.908" in output, output[-3000:]
    record = [json.loads(line[len("DLLL "):]) for line in (tmp_path / "r" / "logs.json").read_text().splitlines()][-1]
    assert {"L1 dice", "L2 dice", "mean_dice", "TOP_mean_dice"} <= set(record["data"])


BRATS_CONFIG = {"in_channels": 4, "n_class": 4, "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "dim": 3,
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}


def test_brats_scores_carry_the_tensorflow_names_and_the_edema():
    model = module_from_argv(["--brats", "--filters", "4", "8", "16"], BRATS_CONFIG)
    assert model.class_names == ["WholeTumor", "TumorCore", "EnhancingTumor", "PeritumoralEdema"]
    assert model.n_outputs == 3 and model.activation == "sigmoid"
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    label[..., 0, :, :] = 1  # edema
    label[..., 1, :, :] = 2  # non-enhancing tumour
    label[..., 2, :, :] = 3  # enhancing tumour
    # Predicted regions (logits > 0): whole tumour right, core takes the edema's slice too, enhancing right.
    output = -torch.ones(1, 3, 4, 4, 4)
    output[0, 0, :3] = 1
    output[0, 1, :3] = 1
    output[0, 2, 2] = 1
    dice = model.case_dice(output, label)
    # Core: predicted 3 slices, true 2 -> 2*2/5; the edema: predicted none, true 1 slice -> 0.
    assert dice.tolist() == pytest.approx([1.0, 0.8, 1.0, 0.0])
    assert model.mean_indices == [1, 2, 3]  # MeanDice: TumorCore, EnhancingTumor, PeritumoralEdema
