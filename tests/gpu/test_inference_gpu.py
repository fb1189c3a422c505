"""Sliding-window prediction, prediction to NIfTI, evaluation and Dice on CUDA against the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import main
from nnunet.checkpoints import model_from_checkpoint
from nnunet.metrics import dice_per_class

pytestmark = pytest.mark.gpu


@pytest.fixture
def exact_cuda_float32():
    """FP32 convolutions and matrix products without TF32, so that CUDA and the CPU compute the same function."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("tta", [False, True])
def test_sliding_window_on_cuda_equals_the_cpu(trained, synthetic_task, exact_cuda_float32, tta) -> None:
    model = model_from_checkpoint(trained / "checkpoints" / "best.ckpt").eval()
    case = sorted(synthetic_task.preprocessed(3).glob("*_x.npy"))[0]
    volume = torch.from_numpy(np.load(case))[None]
    with torch.no_grad():
        on_cpu = model.infer(volume, tta=tta, activation="softmax")
        on_cuda = model.to("cuda").infer(volume.cuda(), tta=tta, activation="softmax")
    assert on_cuda.device.type == "cuda" and on_cuda.shape == on_cpu.shape
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stitch", ["gpu", "cpu"])
def test_half_precision_scores_on_either_device(trained, synthetic_task, exact_cuda_float32, stitch) -> None:
    """Windows on CUDA, the float16 score volume on the GPU or in host memory: the CPU's float32 result."""
    from nnunet.inference import predict_volume

    model = model_from_checkpoint(trained / "checkpoints" / "best.ckpt").eval()
    case = sorted(synthetic_task.preprocessed(3).glob("*_x.npy"))[0]
    volume = torch.from_numpy(np.load(case))[None]
    patch = [16, 16, 16]  # overlapping windows
    with torch.no_grad():
        on_cpu = predict_volume(model.model, volume, patch, activation="softmax")
        half = predict_volume(model.model.to("cuda"), volume.cuda(), patch, activation="softmax",
                              dtype=torch.float16, device=stitch)
    assert half.device.type == ("cuda" if stitch == "gpu" else "cpu") and half.dtype == torch.float16
    assert (half.cpu().float() - on_cpu).abs().max() < 5e-3


def predicted_labels(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: np.asanyarray(nib.load(str(path)).dataobj) for path in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.parametrize("amp", [[], ["--amp"]], ids=["fp32", "amp"])
def test_predictions_on_cuda_match_the_cpu(trained, synthetic_task, tmp_path, amp) -> None:
    outputs = {}
    for gpus in ("0", "1"):
        argv = ["--exec_mode", "predict", "--data", str(synthetic_task.preprocessed(3)), "--results",
                str(tmp_path / gpus), "--num_workers", "2", "--gpus", gpus, "--ckpt_path",
                str(trained / "checkpoints" / "best.ckpt"), "--save_preds", *amp]
        assert main.main(argv) == 0
        outputs[gpus] = predicted_labels(tmp_path / gpus / "predictions")
    assert len(outputs["0"]) == 2 and outputs["0"].keys() == outputs["1"].keys()
    for name, labels in outputs["0"].items():
        # Mixed precision differs between devices (bf16 on the CPU, fp16 on CUDA): near-ties may flip.
        agreement = (outputs["1"][name] == labels).mean()
        assert agreement > (0.99 if amp else 0.999), (name, agreement)


def test_evaluation_on_cuda_gives_the_cpu_dice(trained, synthetic_task, capsys) -> None:
    means = []
    for gpus in ("0", "1"):
        argv = ["--exec_mode", "evaluate", "--data", str(synthetic_task.preprocessed(3)), "--results", str(trained),
                "--nfolds", "4", "--num_workers", "2", "--gpus", gpus, "--ckpt_path",
                str(trained / "checkpoints" / "best.ckpt")]
        assert main.main(argv) == 0
        means.append(float(re.search(r"mean\s+(\d\.\d+)", capsys.readouterr().out).group(1)))
    assert means[1] == pytest.approx(means[0], abs=2e-3)


def test_dice_per_class_on_cuda_matches_cpu() -> None:
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (16, 16, 16), generator=generator, dtype=torch.uint8)
    pred = torch.randint(0, 3, (16, 16, 16), generator=generator, dtype=torch.uint8)
    on_gpu = dice_per_class(pred.cuda(), target.cuda(), 3)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.cpu().tolist() == pytest.approx(dice_per_class(pred, target, 3).tolist())
