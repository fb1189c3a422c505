"""Times nnU-Net v2's training step and sliding-window prediction; run by the peer's own Python.

    NNUNET_PYTHON benchmarks/nnunet_v2_steps.py SPEC.json

This file imports nnU-Net v2 and torch only (it runs in nnU-Net's virtual environment, not this project's).
SPEC.json describes the network and the run, in (D, H, W) order:

    {"mode": "train" | "predict", "patch_size": [...], "spacing": [...], "in_channels": C, "n_class": K,
     "kernels": [[...], ...], "strides": [[...], ...], "filters": [...], "batch_size": B,
     "volume_shape": [...] (predict), "overlap": 0.5, "warmup": W, "steps": N, "threads": T, "workdir": "..."}

The network is nnU-Net's PlainConvUNet with those kernels, strides and filters (two convolutions per level,
instance norm, LeakyReLU: the same network as this project's). Training runs nnUNetTrainer.train_step on
one random batch, without deep supervision; prediction runs nnUNetPredictor.predict_sliding_window_return_logits
on one random volume with gaussian blending and no mirroring. The last line printed is JSON:
{"seconds": [one entry per timed step or case]}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def plans(spec: dict) -> dict:
    """A minimal nnU-Net v2 plans dict with one configuration, 3d_fullres, for the network of `spec`."""
    n_stages = len(spec["kernels"])
    return {
        "continue_training": False,
        "dataset_name": "Dataset999_Benchmark",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spec["spacing"],
        "original_median_shape_after_transp": spec.get("volume_shape", spec["patch_size"]),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": spec["batch_size"],
                "patch_size": spec["patch_size"],
                "median_image_size_in_voxels": spec.get("volume_shape", spec["patch_size"]),
                "spacing": spec["spacing"],
                "normalization_schemes": ["ZScoreNormalization"] * spec["in_channels"],
                "use_mask_for_norm": [False] * spec["in_channels"],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": n_stages,
                        "features_per_stage": spec["filters"],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": spec["kernels"],
                        "strides": spec["strides"],
                        "n_conv_per_stage": [2] * n_stages,
                        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": True,
            }
        },
    }


def dataset_json(spec: dict) -> dict:
    return {"channel_names": {str(c): f"channel {c}" for c in range(spec["in_channels"])},
            "labels": {"background": 0, **{f"class {k}": k for k in range(1, spec["n_class"])}},
            "numTraining": 1, "file_ending": ".nii.gz"}


def timed_calls(call, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_training(spec: dict) -> list[float]:
    import torch
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    # The timed steps use one random batch; no preprocessed dataset is read, so none is looked for.
    trainer_module.infer_dataset_class = lambda folder: None
    trainer = trainer_module.nnUNetTrainer(plans(spec), "3d_fullres", 0, dataset_json(spec), torch.device("cpu"))
    trainer.enable_deep_supervision = False
    trainer.initialize()
    generator = torch.Generator().manual_seed(0)
    shape = (spec["batch_size"], *spec["patch_size"])
    batch = {"data": torch.randn(shape[0], spec["in_channels"], *shape[1:], generator=generator),
             "target": torch.randint(0, spec["n_class"], (shape[0], 1, *shape[1:]), generator=generator).float()}
    return timed_calls(lambda: trainer.train_step(batch), spec["warmup"], spec["steps"])


def time_prediction(spec: dict) -> list[float]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans(spec))
    configuration = manager.get_configuration("3d_fullres")
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, spec["in_channels"],
                                     spec["n_class"], deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=1.0 - spec["overlap"], use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, manager, configuration, None, dataset_json(spec), "nnUNetTrainer",
                                    None)
    torch.set_num_threads(spec["threads"])  # the predictor sets its own count on the CPU
    volume = torch.randn(spec["in_channels"], *spec["volume_shape"], generator=torch.Generator().manual_seed(0))
    return timed_calls(lambda: predictor.predict_sliding_window_return_logits(volume), spec["warmup"], spec["steps"])


def main(path: str) -> None:
    with open(path) as handle:
        spec = json.load(handle)
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(variable, os.path.join(spec["workdir"], variable))
        os.makedirs(os.environ[variable], exist_ok=True)
    import torch

    torch.set_num_threads(spec["threads"])
    seconds = time_training(spec) if spec["mode"] == "train" else time_prediction(spec)
    print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
