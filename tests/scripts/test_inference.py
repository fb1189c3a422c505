import subprocess
import sys
from pathlib import Path

import nibabel as nib

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import inference  # noqa: E402


def test_command_carries_each_flag():
    args, extra = inference.parser().parse_known_args(
        ["--data", "/d/01_3d", "--ckpt_path", "c.ckpt", "--tta", "--amp", "--overlap", "0.25"])
    command = inference.build_command(args, extra)
    assert command[1].endswith("main.py") and command[command.index("--exec_mode") + 1] == "predict"
    assert {"--tta", "--amp"} <= set(command) and "--save_preds" not in command
    assert command[-2:] == ["--overlap", "0.25"]


def test_script_predicts_on_the_cpu(trained, synthetic_task, tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "inference.py"), "--data", str(synthetic_task.preprocessed(3)),
               "--ckpt_path", str(trained / "checkpoints" / "best.ckpt"), "--results", str(tmp_path), "--gpus", "0",
               "--save_preds", "--num_workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted((tmp_path / "predictions").glob("*.nii.gz"))
    assert len(written) == 2 and nib.load(str(written[0])).get_data_dtype() == "uint8"
