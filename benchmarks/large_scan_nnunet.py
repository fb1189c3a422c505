"""Writes an nnU-Net v2 model folder for benchmarks/large_scan.py; run by the peer's own Python.

    NNUNET_PYTHON benchmarks/large_scan_nnunet.py SPEC.json MODEL_FOLDER

SPEC.json is the spec of benchmarks/nnunet_v2_steps.py (patch_size, spacing, in_channels, n_class, kernels,
strides, filters, batch_size; (D, H, W) order) with "ct": {"mean", "std", "clip_low", "clip_high"}, our plan's
CT normalisation. MODEL_FOLDER gets plans.json (one 3d_fullres configuration: nnU-Net's PlainConvUNet with our
network's kernels, strides and channels, CTNormalization with our statistics), dataset.json and
fold_0/checkpoint_final.pth with random weights, which `nnUNetv2_predict_from_modelfolder` then predicts with.
This file imports nnU-Net v2 and torch only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nnunet_v2_steps import dataset_json, plans  # noqa: E402


def ct_plans(spec: dict) -> dict:
    """nnU-Net v2 plans for `spec` with CT normalisation from our plan's foreground statistics."""
    result = plans(spec)
    ct = spec["ct"]
    result["foreground_intensity_properties_per_channel"] = {
        "0": {"mean": ct["mean"], "std": ct["std"], "percentile_00_5": ct["clip_low"],
              "percentile_99_5": ct["clip_high"], "median": ct["mean"], "min": ct["clip_low"], "max": ct["clip_high"]}}
    configuration = result["configurations"]["3d_fullres"]
    configuration["normalization_schemes"] = ["CTNormalization"]
    configuration["use_mask_for_norm"] = [False]
    return result


def main(spec_path: str, folder: str) -> None:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spec = json.loads(Path(spec_path).read_text())
    model = Path(folder)
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    plan = ct_plans(spec)
    dataset = {**dataset_json(spec), "channel_names": {"0": "CT"}}
    (model / "plans.json").write_text(json.dumps(plan, indent=2))
    (model / "dataset.json").write_text(json.dumps(dataset, indent=2))
    configuration = PlansManager(plan).get_configuration("3d_fullres")
    torch.manual_seed(0)
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, spec["in_channels"],
                                     spec["n_class"], deep_supervision=False)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               model / "fold_0" / "checkpoint_final.pth")
    parameters = sum(p.numel() for p in network.parameters())
    print(json.dumps({"parameters": parameters}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
