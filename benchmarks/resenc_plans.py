"""Residual-encoder presets: our plans against nnU-Net v2's for the same dataset fingerprints.

    python benchmarks/resenc_plans.py [--nnunet_python /tmp/nnunet_env/bin/python]

For an isotropic MRI-like fingerprint (1 mm, median 138 x 169 x 138) and an anisotropic CT-like one
(5 x 0.78 x 0.78 mm, median 100 x 512 x 512), 20 identical cases each, prints the 3D patch, batch, stages
and parameter count (1 input channel, 3 classes) of `preprocess.py --planner resenc_m|resenc_l|resenc_xl`
and, with nnU-Net v2 installed in its own environment (benchmarks/nnunet_v2.py), of its ResEnc M/L/XL
planners run on a fingerprint file (no images are needed; a few minutes on the CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import nnunet_v2  # noqa: E402
from data_preprocessing.resenc import plan_resenc  # noqa: E402
from nnunet.network import build_network, parameter_count  # noqa: E402

FINGERPRINTS = {"isotropic MRI": ([138, 169, 138], [1.0, 1.0, 1.0], "MRI"),
                "anisotropic CT": ([100, 512, 512], [5.0, 0.78, 0.78], "CT")}
PRESETS = {"resenc_m": "nnUNetPlannerResEncM", "resenc_l": "nnUNetPlannerResEncL",
           "resenc_xl": "nnUNetPlannerResEncXL"}
CASES = 20

# Run by the peer's Python: writes a dataset.json and a fingerprint of identical cases, plans with each preset
# and prints {preset: [patch, batch, stages, parameters]} as JSON.
PEER_SCRIPT = """
import json, os, sys
shape, spacing, channel, root, cases, planners = json.loads(sys.argv[1])
for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[name] = os.path.join(root, name)
    os.makedirs(os.environ[name], exist_ok=True)
import numpy as np, SimpleITK as sitk
from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as presets
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
dataset = "Dataset901_Fingerprint"
raw = os.path.join(os.environ["nnUNet_raw"], dataset)
os.makedirs(os.path.join(raw, "imagesTr"), exist_ok=True)
os.makedirs(os.path.join(os.environ["nnUNet_preprocessed"], dataset), exist_ok=True)
image = sitk.GetImageFromArray(np.zeros((2, 2, 2), np.float32))  # the planner lists cases; it reads no voxel
for case in range(cases):
    sitk.WriteImage(image, os.path.join(raw, "imagesTr", f"case_{case:03d}_0000.nii.gz"))
json.dump({"channel_names": {"0": channel}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": cases,
           "file_ending": ".nii.gz"}, open(os.path.join(raw, "dataset.json"), "w"))
intensities = {"mean": 100.0, "std": 50.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0, "min": -1000.0,
               "max": 2000.0, "median": 90.0}
json.dump({"spacings": [spacing] * cases, "shapes_after_crop": [shape] * cases,
           "foreground_intensity_properties_per_channel": {"0": intensities},
           "median_relative_size_after_cropping": 1.0},
          open(os.path.join(os.environ["nnUNet_preprocessed"], dataset, "dataset_fingerprint.json"), "w"))
result = {}
for name in planners:
    plans = getattr(presets, name)(901).plan_experiment()
    fullres = plans["configurations"]["3d_fullres"]
    architecture = fullres["architecture"]
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, 3, allow_init=False)
    result[name] = [fullres["patch_size"], fullres["batch_size"], architecture["arch_kwargs"]["n_stages"],
                    sum(p.numel() for p in network.parameters())]
print("RESULT " + json.dumps(result))
"""


def ours(shape: list[int], spacing: list[float], preset: str) -> list:
    planned = plan_resenc(shape, spacing, preset)
    with torch.device("meta"):
        parameters = parameter_count(build_network(1, 3, planned.network))
    return [planned.patch_size, planned.batch_size, planned.network.n_stages, parameters]


def theirs(python: str, shape: list[int], spacing: list[float], channel: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="resenc_plans_") as root:
        arguments = json.dumps([shape, spacing, channel, root, CASES, list(PRESETS.values())])
        done = subprocess.run([python, "-c", PEER_SCRIPT, arguments], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"nnU-Net v2's planner failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnunet_python", default=None, help="the Python of an environment with nnunetv2")
    args = parser.parse_args(argv)
    python, why = nnunet_v2.find_python(args.nnunet_python)
    print(f"{'fingerprint':<16} {'preset':<10} {'patch (ours / v2)':<34} {'batch':>7} {'stages':>7} "
          f"{'parameters M (ours / v2)':>26}")
    for name, (shape, spacing, channel) in FINGERPRINTS.items():
        peer = theirs(python, shape, spacing, channel) if python else {}
        for preset, peer_name in PRESETS.items():
            patch, batch, stages, parameters = ours(shape, spacing, preset)
            other = peer.get(peer_name, ["-", "-", "-", None])
            other_parameters = f"{other[3] / 1e6:.2f}" if other[3] else "-"
            print(f"{name:<16} {preset:<10} {str(patch) + ' / ' + str(other[0]):<34} {f'{batch}/{other[1]}':>7} "
                  f"{f'{stages}/{other[2]}':>7} {f'{parameters / 1e6:.2f} / {other_parameters}':>26}")
    if not python:
        print(f"nnU-Net v2: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
