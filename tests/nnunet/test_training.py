"""Training, resuming, early stopping and evaluation through main.py on the tiny synthetic task."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from nnunet.nn_unet import NNUnet
from nnunet.schedules import make_scheduler
from nnunet.trainer import build_trainer
from tests.conftest import module_from_argv, train_argv
from utils.args import device_settings, parse_main_args
from utils.errors import UserError
from utils.logger import read_logs
from utils.settings import OptimSettings

ROOT = Path(__file__).resolve().parents[2]


def epoch_records(results: Path) -> list[dict]:
    return [r for r in read_logs(results / "logs.json") if r["type"] == "LOG" and isinstance(r["step"], int)]


def test_training_lowers_the_loss_and_raises_dice(synthetic_task, tmp_path):
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--epochs", "4", "--train_batches", "20",
                      "--learning_rate", "5e-3")
    assert main.main(argv) == 0
    records = epoch_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    losses = [r["data"]["train_loss"] for r in records]
    assert losses[-1] < 0.8 * losses[0]
    # An untrained network scores near 0 on the nested classes; 80 steps reach well past 0.4.
    assert records[-1]["data"]["best_dice"] > 0.4
    assert len(records[-1]["data"]["dice"]) == 3
    assert (tmp_path / "params.json").is_file() and (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_the_same_seed_gives_the_same_run(synthetic_task, tmp_path):
    runs = []
    for name in ("a", "b"):
        argv = train_argv(synthetic_task.preprocessed(3), tmp_path / name, "--epochs", "1", "--train_batches", "4")
        assert main.main(argv) == 0
        runs.append(epoch_records(tmp_path / name)[0]["data"])
    assert runs[0]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-6)
    assert runs[0]["dice"] == pytest.approx(runs[1]["dice"], rel=1e-6)


def test_resume_continues_at_the_next_epoch_with_the_optimizer_state(synthetic_task, trained, tmp_path):
    results = tmp_path / "resumed"
    shutil.copytree(trained, results)
    first = torch.load(results / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 1 and first["global_step"] == 20
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "3", "--train_batches", "10",
                      "--learning_rate", "5e-3", "--save_ckpt", "--resume_training")
    assert main.main(argv) == 0
    assert [r["step"] for r in epoch_records(results)] == [0, 1, 2]
    last = torch.load(results / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 30
    adam_steps = {float(state["step"]) for state in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {30.0}
    assert last["nnunet"]["best_dice"] >= first["nnunet"]["best_dice"]


def test_early_stopping_stops_when_dice_stops_improving(synthetic_task, tmp_path):
    # A learning rate this small leaves the weights unchanged in float32, so Dice never improves.
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--epochs", "8", "--train_batches", "2",
                      "--optimizer", "sgd", "--learning_rate", "1e-12", "--patience", "2")
    assert main.main(argv) == 0
    assert len(epoch_records(tmp_path)) == 3


def test_evaluate_prints_per_class_dice(trained, synthetic_task, capsys):
    argv = ["--exec_mode", "evaluate", "--data", str(synthetic_task.preprocessed(3)), "--results", str(trained),
            "--nfolds", "4", "--num_workers", "2", "--ckpt_path", str(trained / "checkpoints" / "best.ckpt")]
    assert main.main(argv) == 0
    table = capsys.readouterr().out
    assert re.search(r"D1 edema\s+\d\.\d{4}", table) and "mean" in table
    best = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)["nnunet"]["best_dice"]
    mean = float(re.search(r"mean\s+(\d\.\d+)", table).group(1))
    assert mean == pytest.approx(best, abs=1e-4)


def test_two_cpu_processes_give_the_same_validation_dice(trained, synthetic_task, capsys):
    argv = ["--exec_mode", "evaluate", "--data", str(synthetic_task.preprocessed(3)), "--results", str(trained),
            "--nfolds", "4", "--num_workers", "1", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt")]
    assert main.main(argv) == 0  # one process, in this one
    pattern = r"(D\d .*|mean .*|validation loss .*)"
    alone = re.findall(pattern, capsys.readouterr().out)
    # Two DDP processes over gloo need a process of their own.
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv, "--cpu_processes", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.findall(pattern, result.stdout) == alone and len(alone) == 5


@pytest.mark.parametrize(
    "dim, flags",
    [
        (3, ["--deep_supervision", "--res_block", "--focal", "--norm", "group", "--amp", "--negative_slope", "0.1",
             "--min_fmap", "2"]),
        (3, ["--optimizer", "sgd", "--scheduler", "cosine", "--lr_warmup_epochs", "1", "--gradient_clip_val", "1.0",
             "--norm", "batch", "--oversampling", "1.0", "--no_rotation"]),
        (2, ["--deep_supervision", "--deep_supr_num", "1", "--batch_size", "8", "--nvol", "2", "--optimizer", "radam"]),
        (3, ["--brats", "--optimizer", "adamw", "--scheduler", "plateau", "--skip_first_n_eval", "1", "--eval_every",
             "1"]),
    ],
)
def test_variants_train(synthetic_task, tmp_path, dim, flags):
    argv = train_argv(synthetic_task.preprocessed(dim), tmp_path, "--epochs", "2", "--train_batches", "2",
                      "--dim", str(dim), *flags)
    assert main.main(argv) == 0
    records = epoch_records(tmp_path)
    assert len(records) == 2 and all(r["data"]["train_loss"] == r["data"]["train_loss"] for r in records)
    if "--skip_first_n_eval" in flags:
        assert "dice" not in records[0]["data"] and "dice" in records[1]["data"]
    if "--brats" in flags:
        data = records[1]["data"]
        assert len(data["dice"]) == 4 and data["MeanDice"] == data["dice_mean"]
        assert data["MeanDice"] == pytest.approx((data["TumorCore"] + data["EnhancingTumor"]
                                                  + data["PeritumoralEdema"]) / 3)
        assert {"WholeTumor", "TumorCore", "EnhancingTumor", "PeritumoralEdema"} <= set(data)


def test_a_network_the_patch_cannot_hold_is_a_clear_error(synthetic_task, tmp_path, capsys):
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--deep_supervision", "--deep_supr_num", "3")
    assert main.main(argv) == 1
    assert "--deep_supr_num 3 must be between" in capsys.readouterr().err


def test_wrong_checkpoints_are_clear_errors(trained, synthetic_task, tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    other_task = tmp_path / "other.ckpt"
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["config"]["n_class"] = 6
    torch.save(checkpoint, other_task)
    base = ["--exec_mode", "evaluate", "--data", str(synthetic_task.preprocessed(3)), "--results", str(tmp_path)]
    for path, message in ((garbage, "not a readable checkpoint"), (other_task, "trained for 6 classes"),
                          (tmp_path / "missing.ckpt", "does not exist")):
        assert main.main([*base, "--ckpt_path", str(path)]) == 1
        assert message in capsys.readouterr().err
    # --dim cannot turn a 3D checkpoint into a 2D network.
    assert main.main([*base, "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--dim", "2"]) == 1
    assert "holds a 3D network; --dim 2 cannot change that" in capsys.readouterr().err


def schedule(name: str, epochs: int = 10, **options) -> list[float]:
    settings = {"lr_gamma": 0.1, "lr_patience": 1, "learning_rate": 1.0, **options}
    settings["lr_steps"] = tuple(settings.get("lr_steps", ()))
    args = OptimSettings(scheduler=name, epochs=epochs, **settings)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make_scheduler(optimizer, args)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(0.5) if name == "plateau" else scheduler.step()
    return rates


def test_learning_rate_schedules():
    assert make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                          OptimSettings(scheduler="none", epochs=3)) is None
    cosine = schedule("cosine", lr_warmup_epochs=2)
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0]) and cosine[-1] < 0.05
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert schedule("poly", epochs=4) == pytest.approx([(1 - e / 4) ** 0.9 for e in range(4)])
    assert schedule("multistep", lr_steps=[2, 5]) == pytest.approx([1, 1, 0.1, 0.1, 0.1] + [0.01] * 5)
    # After a warmup, poly and cosine decay over the remaining epochs and end near zero.
    assert schedule("poly", epochs=10, lr_warmup_epochs=5)[-1] == pytest.approx((1 - 4 / 5) ** 0.9)
    plateau = schedule("plateau", lr_gamma=0.5)
    assert plateau[0] == 1.0 and plateau[-1] < 0.1
    # The MLPerf UNet3D warmup: linear from the start rate, the base rate in the last warmup epoch, then constant.
    mlperf = schedule("none", epochs=8, lr_warmup_epochs=4, learning_rate=0.8, warmup_start_lr=1e-4)
    start = 1e-4 / 0.8  # factors of the optimizer's base rate
    assert mlperf == pytest.approx([start + (1 - start) * e / 4 for e in (1, 2, 3, 4)] + [1.0] * 4)
    assert schedule("multistep", lr_steps=[1], lr_warmup_epochs=2)[:4] == pytest.approx([0.5, 1.0, 1.0, 0.1])
    with pytest.raises(UserError, match="does not combine"):
        schedule("plateau", lr_warmup_epochs=2)


def test_train_script_builds_the_recommended_command():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    args, extra = train_script.parser().parse_known_args(["--data", "/d/01_3d", "--dim", "3", "--amp", "--epochs",
                                                          "5"])
    command = train_script.build_command(args, extra)
    assert command[1].endswith("main.py") and command[-2:] == ["--epochs", "5"]
    assert "--amp" in command and command[command.index("--batch_size") + 1] == "2"
    args, extra = train_script.parser().parse_known_args(["--data", "/d/01_2d", "--dim", "2"])
    command = train_script.build_command(args, extra)
    assert command[command.index("--batch_size") + 1] == "64" and "--nvol" in command


def test_accelerator_flag_names_any_lightning_accelerator(synthetic_task, tmp_path, capsys):
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--epochs", "1", "--train_batches", "1")
    assert main.main([*argv, "--accelerator", "cpu"]) == 0
    assert len(epoch_records(tmp_path)) == 1
    # One this machine lacks, or a name Lightning does not know: one line, before any work.
    assert main.main([*argv, "--accelerator", "mps"]) == 1
    assert "--accelerator mps" in capsys.readouterr().err
    assert main.main([*argv, "--accelerator", "abacus"]) == 1
    assert "invalid accelerator name" in capsys.readouterr().err


def test_cuda_calls_sit_behind_the_device_choice():
    """Only the modules that choose the device (nnunet/trainer.py, the DALI device in data_loading/dali_loader.py)
    call CUDA directly; everything else follows the Trainer's device."""
    allowed = {"nnunet/trainer.py", "data_loading/dali_loader.py"}
    pattern = re.compile(r"torch\.cuda\.|\.cuda\(")
    for folder in ("nnunet", "data_loading", "data_preprocessing", "utils", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            name = path.relative_to(ROOT).as_posix()
            if name not in allowed:
                assert not pattern.search(path.read_text()), f"{name} calls CUDA directly"


def test_optimisation_flags_reach_the_optimizer_scheduler_and_trainer():
    config = {"in_channels": 1, "n_class": 2, "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "dim": 3,
              "labels": {"0": "background", "1": "a"}}
    argv = ["--filters", "4", "8", "16", "--optimizer", "sgd", "--learning_rate", "0.3", "--momentum", "0.8",
            "--weight_decay", "0.01", "--scheduler", "plateau", "--eval_every", "3", "--lr_gamma", "0.25",
            "--lr_patience", "2"]
    setup = module_from_argv(argv, config).configure_optimizers()
    group = setup["optimizer"].param_groups[0]
    assert isinstance(setup["optimizer"], torch.optim.SGD) and group["nesterov"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.8, 0.01)
    plateau = setup["lr_scheduler"]
    # Stepped in evaluated epochs only: patience counts evaluations.
    assert plateau["frequency"] == 3 and plateau["monitor"] == "dice_mean"
    assert (plateau["scheduler"].factor, plateau["scheduler"].patience) == (0.25, 2)
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam)):
        optimizer = module_from_argv(["--filters", "4", "8", "16", "--optimizer", name, "--weight_decay", "0.02"],
                                     config).configure_optimizers()["optimizer"]
        assert type(optimizer) is kind and optimizer.param_groups[0]["weight_decay"] == 0.02

    args = parse_main_args(["--eval_every", "3", "--gradient_clip_val", "1.5", "--amp"])
    trainer = build_trainer(device_settings(args), [], check_val_every_n_epoch=args.eval_every,
                            gradient_clip_val=args.gradient_clip_val)
    assert trainer.check_val_every_n_epoch == 3 and trainer.gradient_clip_val == 1.5
    assert trainer.precision == "bf16-mixed"  # --amp on the CPU


def test_amp_dtype_reaches_the_trainer_precision(capsys):
    def precision(*argv: str) -> str:
        return build_trainer(device_settings(parse_main_args(list(argv))), []).precision

    assert precision() == "32-true"
    assert precision("--amp", "--amp_dtype", "bf16") == "bf16-mixed"
    with pytest.raises(UserError, match="fp16 runs on CUDA only"):  # the CPU autocasts to bf16 only
        precision("--amp", "--amp_dtype", "fp16")
    with pytest.raises(SystemExit):
        parse_main_args(["--amp_dtype", "bf16"])
    assert "--amp_dtype bf16 needs --amp" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--momentum", "--weight_decay", "--warmup_start_lr", "--gradient_clip_val"])
def test_negative_rates_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        parse_main_args([flag, "-0.1"])
    assert "expected a number >= 0" in capsys.readouterr().err


def test_skipped_evaluations_read_no_validation_volume(synthetic_task, tmp_path, monkeypatch):
    evaluated = []
    step = NNUnet.validation_step

    def counting(self, batch, batch_idx):
        evaluated.append(self.current_epoch)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(NNUnet, "validation_step", counting)
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--epochs", "3", "--train_batches", "1",
                      "--skip_first_n_eval", "2")
    assert main.main(argv) == 0
    assert set(evaluated) == {2} and len(evaluated) == 2  # the fold's two validation cases, in epoch 2 only
    assert ["dice" in record["data"] for record in epoch_records(tmp_path)] == [False, False, True]


def test_model_and_inference_flags_reach_the_network_loss_and_sliding_window(tmp_path, monkeypatch):
    config = {"in_channels": 1, "n_class": 3, "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "dim": 3,
              "labels": {"0": "background", "1": "a", "2": "b"}}
    argv = ["--filters", "4", "8", "16", "--norm", "group", "--negative_slope", "0.1", "--focal", "--overlap",
            "0.25", "--blend", "constant", "--tta", "--val_batch_size", "3"]
    model = module_from_argv(argv, config)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.model.modules())
    slopes = {m.negative_slope for m in model.model.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.1} and model.base_loss.focal
    calls = []

    def record(network, image, patch_size, **options):
        calls.append(options)
        return torch.zeros(1, 3, *image.shape[2:])

    monkeypatch.setattr("nnunet.nn_unet.predict_volume", record)
    monkeypatch.setattr(model, "export", lambda *args: None)
    (tmp_path / "case_meta.json").write_text("{}")
    model.meta_dir = str(tmp_path)
    model.predict_step({"case_id": ["case"], "image": torch.zeros(1, 1, 16, 16, 16)}, 0)
    assert calls == [{"overlap": 0.25, "blend": "constant", "batch_size": 3, "tta": True, "activation": "softmax",
                      "dtype": torch.float16, "device": "auto"}]
