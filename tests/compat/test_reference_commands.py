"""The reference nnU-Net README's commands, with only the data paths changed, on the tiny synthetic task.

Each wrapper script is checked through the main.py command it builds, run in this process (a subprocess per
command would cost a Python start-up each); `tests/scripts/` runs the scripts themselves. Every reference flag
either works or stops with its documented one-line message (`utils.reference_flags`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import main
from utils.args import parse_main_args
from utils.reference_flags import ALIASES, REFUSED

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark as benchmark_script  # noqa: E402
import inference as inference_script  # noqa: E402
import train as train_script  # noqa: E402

# Appended to every command: a short CPU run of the tiny network.
TINY = ["--num_workers", "2", "--nfolds", "4", "--seed", "0"]


def script_argv(script, argv: list[str]) -> list[str]:
    """The main.py arguments a wrapper script builds from its command line."""
    parser = script.parser() if hasattr(script, "parser") else script.benchmark_parser()
    args, extra = parser.parse_known_args(argv)
    return script.build_command(args, extra)[2:]


def test_train_script_addresses_the_task_in_the_data_root(synthetic_task, tmp_path, capsys):
    # python scripts/train.py --gpus <gpus> --fold <fold> --dim <dim> [--amp]
    argv = script_argv(train_script, ["--data", str(synthetic_task.data), "--task", "00", "--results", str(tmp_path),
                                      "--gpus", "0", "--fold", "0", "--dim", "3"])
    assert main.main([*argv, *TINY, "--epochs", "1", "--train_batches", "2", "--deep_supr_num", "1"]) == 0
    assert f"results in {tmp_path}" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_main_trains_2d_with_its_own_defaults(synthetic_task, tmp_path):
    # python main.py --exec_mode train --task 01 --fold 0 --gpus 1 --amp --deep_supervision (2D, on the CPU)
    assert main.main(["--exec_mode", "train", "--data", str(synthetic_task.data), "--task", "00", "--dim", "2",
                      "--fold", "0", "--gpus", "0", "--results", str(tmp_path), *TINY, "--epochs", "1",
                      "--train_batches", "2"]) == 0


def test_resume_names_the_checkpoint_and_epoch(trained, tmp_path, synthetic_task, capsys):
    results = tmp_path / "results"
    shutil.copytree(trained, results)
    argv = ["--exec_mode", "train", "--data", str(synthetic_task.data), "--task", "00", "--results", str(results),
            "--filters", "8", "16", "32", "64", "--batch_size", "2", "--epochs", "2", "--resume_training", *TINY]
    assert main.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"resuming from {results / 'checkpoints' / 'last.ckpt'} at epoch 2"


def test_inference_script_predicts_where_it_says(trained, synthetic_task, tmp_path, capsys):
    # python scripts/inference.py --dim <dim> --fold <fold> --ckpt_path <path> [--amp] [--tta] [--save_preds]
    argv = script_argv(inference_script, ["--data", str(synthetic_task.data), "--task", "00", "--dim", "3",
                                          "--fold", "0", "--ckpt_path", str(trained / "checkpoints" / "best.ckpt"),
                                          "--results", str(tmp_path), "--save_preds"])
    assert "--gpus" not in argv  # the device is main.py's default: the GPU when there is one
    assert main.main([*argv, *TINY]) == 0
    assert f"predicted 2 case(s) into {tmp_path / 'predictions'}" in capsys.readouterr().out
    assert len(list((tmp_path / "predictions").glob("*.nii.gz"))) == 2


def test_evaluate_honours_tta_and_refuses_save_preds(trained, synthetic_task, tmp_path, capsys):
    argv = ["--exec_mode", "evaluate", "--data", str(synthetic_task.data), "--task", "00", "--fold", "0",
            "--ckpt_path", str(trained / "checkpoints" / "best.ckpt"), "--results", str(tmp_path), *TINY]
    assert main.main([*argv, "--save_preds"]) == 1
    assert "--exec_mode evaluate scores fold 0 and writes no files" in capsys.readouterr().err
    assert main.main([*argv, "--tta", "--test_batches", "1"]) == 0
    assert "validation loss" in capsys.readouterr().out


def test_benchmark_script_times_the_addressed_task(synthetic_task, tmp_path, capsys):
    # python scripts/benchmark.py --mode train --gpus <ngpus> --dim {2,3} --batch_size <bsize> [--amp]
    argv = script_argv(benchmark_script, ["--mode", "train", "--gpus", "0", "--dim", "3", "--batch_size", "2",
                                          "--data", str(synthetic_task.data), "--task", "00", "--train_batches", "1",
                                          "--warmup", "1", "--results", str(tmp_path)])
    assert main.main([*argv, *TINY, "--filters", "8", "16", "32", "64"]) == 0
    assert f"data: {synthetic_task.preprocessed(3)}" in capsys.readouterr().out


def test_a_missing_task_names_the_folders_that_exist(synthetic_task, tmp_path, capsys):
    root = str(synthetic_task.data)
    assert main.main(["--data", root, "--task", "01", "--dim", "3", "--results", str(tmp_path)]) == 1
    assert (f"error: no preprocessed task 01_3d in {root} (found: 00_2d, 00_3d); run preprocess.py --task 01 --dim 3"
            in capsys.readouterr().err)
    assert main.main(["--data", root, "--results", str(tmp_path)]) == 1
    assert "holds the preprocessed tasks 00_2d, 00_3d: add --task and --dim" in capsys.readouterr().err


def test_a_task_folder_and_its_val_folder_are_used_as_given(synthetic_task):
    from utils.args import loader_settings

    folder = synthetic_task.preprocessed(2)
    assert loader_settings(parse_main_args(["--data", str(folder), "--task", "05"])).data == str(folder)
    task = parse_main_args(["--data", str(synthetic_task.data), "--task", "0"])
    assert loader_settings(task).data == str(synthetic_task.preprocessed(3))


# Every flag of the reference main.py's --help (its README's list and its later utils/args.py).
REFERENCE_FLAGS = """exec_mode data results logname task gpus num_nodes learning_rate gradient_clip_val
accumulate_grad_batches
negative_slope tta amp benchmark deep_supervision sync_batchnorm save_ckpt nfolds seed ckpt_path fold patience
lr_patience batch_size val_batch_size steps create_idx profile momentum weight_decay save_preds dim resume_training
factor num_workers min_epochs max_epochs warmup oversampling norm overlap affinity scheduler optimizer val_mode
train_batches test_batches more_chn invert_resampled_y focal brats epochs depth min_fmap deep_supr_num res_block
filters ckpt_store_dir data2d_dim blend residual""".split()


def test_every_reference_flag_is_ours_an_alias_or_refused():
    from utils.args import main_parser

    options = main_parser()._option_string_actions
    assert [flag for flag in REFERENCE_FLAGS if f"--{flag}" not in options] == []


@pytest.mark.parametrize("flag", sorted(ALIASES))
def test_reference_aliases_set_our_flags(flag):
    ours, keywords = ALIASES[flag]
    value = {"--val_mode": ["constant"], "--factor": ["0.5"], "--steps": ["10", "20"]}.get(flag, ["3"])
    value = [] if keywords.get("nargs") == 0 else value
    expected = parse_main_args([ours, *value])
    assert getattr(parse_main_args([flag, *value]), ours.lstrip("-")) == getattr(expected, ours.lstrip("-"))


@pytest.mark.parametrize("argv", [[flag] for flag in sorted(REFUSED)] + [["--affinity", "socket"]])
def test_reference_flags_without_meaning_stop_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_main_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and REFUSED[argv[0]] in err


def test_reference_scheduler_optimizer_and_epochs():
    assert parse_main_args(["--scheduler"]).scheduler == "cosine"
    assert parse_main_args(["--scheduler", "--epochs", "3"]).scheduler == "cosine"
    assert parse_main_args(["--scheduler", "multistep", "--steps", "5"]).lr_steps == [5]
    assert parse_main_args(["--min_epochs", "5", "--max_epochs", "9"]).epochs == 9
    with pytest.raises(SystemExit):
        parse_main_args(["--optimizer", "fused_adam"])


def test_help_shows_each_default_once(capsys):
    from utils.args import main_parser

    text = " ".join(main_parser().format_help().split())
    assert "optimizer (default: adam)" in text and "(default: 1 with CUDA, else 0)" in text
    options = text.split(" --")
    assert [option for option in options if option.count("(default") > 1] == []
