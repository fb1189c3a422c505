"""Known tasks: the Medical Segmentation Decathlon (MSD) tasks 01-10.

Spacings and patch sizes are in (D, H, W) order, i.e. the slice axis (NIfTI z) first, in mm and
voxels. They follow the published nnU-Net plans for MSD. CT statistics are the foreground-voxel
0.5 / 99.5 percentiles, mean and standard deviation of each CT task's training set. A task that
is not listed here is planned from its data by `data_preprocessing.planner`.
"""

from __future__ import annotations

MSD_TASKS: dict[str, str] = {
    "01": "Task01_BrainTumour",
    "02": "Task02_Heart",
    "03": "Task03_Liver",
    "04": "Task04_Hippocampus",
    "05": "Task05_Prostate",
    "06": "Task06_Lung",
    "07": "Task07_Pancreas",
    "08": "Task08_HepaticVessel",
    "09": "Task09_Spleen",
    "10": "Task10_Colon",
}

SYNTHETIC_TASK = "Task00_Synthetic"

# Target spacing in mm, (D, H, W).
SPACINGS: dict[str, list[float]] = {
    "01": [1.0, 1.0, 1.0],
    "02": [1.37, 1.25, 1.25],
    "03": [1.0, 0.7676, 0.7676],
    "04": [1.0, 1.0, 1.0],
    "05": [3.6, 0.62, 0.62],
    "06": [1.24, 0.79, 0.79],
    "07": [2.5, 0.8, 0.8],
    "08": [1.5, 0.8, 0.8],
    "09": [1.6, 0.79, 0.79],
    "10": [3.0, 0.78, 0.78],
}

# Training patch in voxels: (D, H, W) for 3D, (H, W) for 2D.
PATCH_SIZES: dict[str, list[int]] = {
    "01_3d": [128, 128, 128],
    "02_3d": [80, 192, 160],
    "03_3d": [128, 128, 128],
    "04_3d": [40, 56, 40],
    "05_3d": [20, 320, 256],
    "06_3d": [80, 192, 160],
    "07_3d": [40, 224, 224],
    "08_3d": [64, 192, 192],
    "09_3d": [64, 192, 160],
    "10_3d": [56, 192, 160],
    "01_2d": [192, 160],
    "02_2d": [320, 256],
    "03_2d": [512, 512],
    "04_2d": [56, 40],
    "05_2d": [320, 320],
    "06_2d": [512, 512],
    "07_2d": [512, 512],
    "08_2d": [512, 512],
    "09_2d": [512, 512],
    "10_2d": [512, 512],
}

# CT intensity statistics of the foreground: clip range, then mean and std for the z-score.
CT_STATS: dict[str, dict[str, float]] = {
    "03": {"clip_low": -17.0, "clip_high": 201.0, "mean": 99.40, "std": 39.36},
    "06": {"clip_low": -1024.0, "clip_high": 325.0, "mean": -158.58, "std": 324.70},
    "07": {"clip_low": -96.0, "clip_high": 215.0, "mean": 77.99, "std": 75.40},
    "08": {"clip_low": -3.0, "clip_high": 243.0, "mean": 104.37, "std": 52.62},
    "09": {"clip_low": -41.0, "clip_high": 176.0, "mean": 99.29, "std": 39.47},
    "10": {"clip_low": -30.0, "clip_high": 165.82, "mean": 62.18, "std": 32.65},
}


def task_number(task: str) -> str:
    """'1', '01', 'Task01_BrainTumour' -> '01'; names without a number are returned unchanged."""
    if task.isdigit():
        return f"{int(task):02d}"
    if task.startswith("Task") and task[4:6].isdigit():
        return task[4:6]
    return task
