"""Known tasks: the Medical Segmentation Decathlon (MSD) tasks 01-10, and KiTS19 with the MLPerf rules.

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


# KiTS19 (kidney and kidney tumour CT) as the MLPerf Training UNet3D reference preprocesses it
# (mlcommons/training, image_segmentation/pytorch/preprocess_dataset.py). The case files store
# (Z, Y, X) arrays, so spacings here are (D, H, W) = (Z, Y, X) as everywhere else.
KITS19_IMAGE = "imaging.nii.gz"
KITS19_LABEL = "segmentation.nii.gz"
KITS19_LABELS: dict[str, str] = {"0": "background", "1": "kidney", "2": "tumour"}
KITS19_LABELLED_CASES = 210  # case_00000 .. case_00209; later case numbers have no public segmentation
KITS19_PATCH_SIZE = [128, 128, 128]  # volumes are padded (edge values) to at least this
KITS19_CT: dict[str, float] = {"clip_low": -79.0, "clip_high": 304.0, "mean": 101.0, "std": 76.9}
KITS19_DEFAULT_RECIPE = "final"
KITS19_RECIPES: dict[str, dict] = {
    # The reference's current rules: every labelled case, 1.6 x 1.2 x 1.2 mm.
    "final": {"spacing": [1.6, 1.2, 1.2], "excluded": []},
    # The first MLPerf round (v1.0): 1.6 x 1.0 x 1.0 mm without six cases with suspected label errors.
    "v1.0": {"spacing": [1.6, 1.0, 1.0], "excluded": [15, 23, 37, 68, 125, 133]},
}
# The reference's fixed validation split: the 42 cases of its evaluation_cases.txt (also published as
# mlcommons/inference vision/medical_imaging/3d-unet-kits19/meta/inference_cases.json). Every other
# labelled case trains.
KITS19_EVALUATION_CASES: list[str] = [f"case_{number:05d}" for number in (
    0, 3, 5, 6, 12, 24, 34, 41, 44, 49, 52, 56, 61, 65, 66, 70, 76, 78, 80, 84, 86,
    87, 92, 111, 112, 125, 128, 138, 157, 160, 161, 162, 169, 171, 176, 185, 187, 189, 198, 203, 206, 207,
)]


# Input channels (modalities) and classes (background included) of each MSD task's dataset.json: with the
# spacings and patch sizes above they describe a task's network without its data (benchmarks on random volumes).
MSD_CHANNELS: dict[str, int] = {"01": 4, "02": 1, "03": 1, "04": 1, "05": 2, "06": 1, "07": 1, "08": 1, "09": 1,
                                "10": 1}
MSD_CLASSES: dict[str, int] = {"01": 4, "02": 2, "03": 3, "04": 3, "05": 3, "06": 2, "07": 3, "08": 3, "09": 2,
                               "10": 2}
