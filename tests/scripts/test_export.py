"""scripts/export.py: a package's networks as ONNX files that compute the logits PyTorch computes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet.predictor import Predictor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import export  # noqa: E402

onnxruntime = pytest.importorskip("onnxruntime")


def test_exported_fold_gives_pytorch_logits_on_any_divisible_size(model_package, tmp_path, capsys):
    output = tmp_path / "onnx" / "tiny.onnx"
    assert export.main(["--model", str(model_package), "--onnx", str(output), "--folds", "1"]) == 0
    path = tmp_path / "onnx" / "tiny_3d_fold1.onnx"
    assert capsys.readouterr().out.split() == [str(path)]
    description = json.loads(output.with_suffix(".json").read_text())
    (network,) = description["networks"]
    assert network["file"] == path.name and network["output"]["activation"] == "softmax"
    model = Predictor.from_package(model_package, folds=[1]).members[0].model
    assert network["input"]["patch_size"] == list(model.patch_size)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    divisible = network["input"]["divisible_by"]
    # The plan's patch, then another batch and size (dynamic axes).
    for shape in ([1, 2, *model.patch_size], [2, 2, *(2 * n for n in divisible)]):
        image = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model.model(image).numpy()
        logits = session.run(["logits"], {"image": image.numpy()})[0]
        assert logits.shape == expected.shape
        assert float(np.abs(logits - expected).max()) < 1e-4


def test_export_of_a_fold_the_package_lacks_is_one_line(model_package, tmp_path, capsys):
    assert export.main(["--model", str(model_package), "--onnx", str(tmp_path / "x.onnx"), "--folds", "4"]) == 1
    assert "--folds 4" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
