"""Planning a task from its data: the fingerprint of each case, CT statistics, and the task's plan.

The plan comes from a fixed recipe (KiTS19), the published MSD values where there are some, or the
data: target spacing, patch size (`planner`, or the residual-encoder presets of `resenc`) and CT
statistics, then checked and completed by `plans`.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np

from data_preprocessing import configs, planner, plans, resenc
from data_preprocessing.layouts import CaseFiles, PreprocessingError, RawTask
from data_preprocessing.reading import load_case
from data_preprocessing.resample import resampled_shape
from data_preprocessing.transforms import nonzero_box
from data_preprocessing.workers import run_parallel

CT_SAMPLES_PER_CASE = 10_000


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def is_ct(modality: str) -> bool:
    return modality.strip().upper() == "CT"


def _fingerprint_case(task_dir: Path, case: CaseFiles, n_channels: int, label_values: list[int],
                      ct_channels: list[int], seed: int) -> dict:
    """Spacing, cropped shape and a sample of foreground intensities of one training case."""
    loaded = load_case(task_dir, case, n_channels, label_values)
    box = nonzero_box(loaded.image, loaded.label)
    samples = {}
    if ct_channels and loaded.label is not None:
        foreground = loaded.label > 0
        rng = np.random.default_rng(seed)
        for channel in ct_channels:
            values = loaded.image[channel][foreground]
            if values.size > CT_SAMPLES_PER_CASE:
                values = rng.choice(values, CT_SAMPLES_PER_CASE, replace=False)
            samples[channel] = values
    return {"spacing": loaded.spacing, "shape": [stop - start for start, stop in box], "samples": samples}


def ct_statistics(samples: np.ndarray) -> dict:
    """Clip range (0.5 / 99.5 percentiles), mean and std of foreground CT intensities within that range."""
    if samples.size == 0:
        raise PreprocessingError("no foreground voxels in the training labels to compute CT statistics from")
    low, high = np.percentile(samples, [0.5, 99.5])
    # Of the clipped values, in float64: a few absurd voxels (1e30) would otherwise make them huge or infinite.
    clipped = np.clip(samples.astype(np.float64), low, high)
    return {"type": "ct", "clip_low": float(low), "clip_high": float(high),
            "mean": float(clipped.mean()), "std": float(clipped.std())}


def plan_task(raw: RawTask, dim: int, pool: concurrent.futures.Executor | None = None,
              planner_name: str = "default") -> dict:
    """The task's config: the fixed recipe (KiTS19) or the published MSD values where there are some, else
    planned from the data (target spacing, patch size, CT statistics); checked and completed by `plans`.

    The residual-encoder presets (`planner_name` resenc_m, resenc_l, resenc_xl) always plan from the data: their
    patch and batch size follow from the median shape and the preset's memory budget (`resenc.plan_resenc`).
    """
    number = raw.key
    n_channels = len(raw.modalities)
    label_values = [int(k) for k in raw.labels]
    ct_channels = [int(k) for k, name in raw.modalities.items() if is_ct(name)]
    patch_key = f"{number}_{dim}d"
    plan: dict = {}

    if raw.recipe is not None:
        plan = dict(raw.recipe)
        spacing, patch_size, normalization = plan.pop("spacing"), plan.pop("patch_size"), plan.pop("normalization")
    elif planner_name == "default" and raw.layout == "msd" and number in configs.SPACINGS \
            and patch_key in configs.PATCH_SIZES:
        spacing = list(configs.SPACINGS[number])
        patch_size = list(configs.PATCH_SIZES[patch_key])
        ct_stats = configs.CT_STATS.get(number)
        if ct_channels and ct_stats is None:
            raise PreprocessingError(f"task {number} has a CT channel but no CT statistics in configs.py")
        channel_ct = {c: {"type": "ct", **ct_stats} for c in ct_channels} if ct_channels else {}
        normalization = [channel_ct.get(c, {"type": "zscore"}) for c in range(n_channels)]
    else:
        if not raw.training:
            raise PreprocessingError(f"{raw.root} has no training cases to plan from")
        fingerprints = run_parallel(
            _fingerprint_case,
            [(raw.root, case, n_channels, label_values, ct_channels, index)
             for index, case in enumerate(raw.training)],
            pool, "planning")
        spacings = np.array([f["spacing"] for f in fingerprints])
        spacing = planner.target_spacing(spacings)
        shapes = np.array([resampled_shape(f["shape"], f["spacing"], spacing) for f in fingerprints])
        median_shape = np.median(shapes, axis=0)
        if planner_name != "default":
            preset = resenc.plan_resenc(median_shape[-dim:], spacing[-dim:], planner_name, len(raw.labels))
            patch_size, plan["batch_size"], plan["network"] = preset.patch_size, preset.batch_size, \
                preset.network.to_dict()
        elif dim == 3:
            patch_size = planner.plan_patch_size(median_shape, spacing)
        else:
            patch_size = planner.plan_patch_size(median_shape[1:], spacing[1:])
        channel_ct = {c: ct_statistics(np.concatenate([f["samples"][c] for f in fingerprints])) for c in ct_channels}
        zscore = {"type": "zscore"} if raw.zscore_nonzero else {"type": "zscore", "nonzero": False}
        normalization = [channel_ct.get(c, zscore) for c in range(n_channels)]

    plan.update(dim=dim, spacing=spacing, patch_size=patch_size, normalization=normalization,
                in_channels=n_channels, n_class=len(raw.labels), planner=planner_name)
    return plans.check_plan(plan, raw, dim, f"the plan of {raw.name}")
