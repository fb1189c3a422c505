"""nnU-Net v2 as a peer: finding its Python, its folders, converting a task to its layout, timing its steps.

nnU-Net v2 lives in its own virtual environment: `pip install nnunetv2` pulls a CUDA build of torch and,
through timm, of torchvision, which do not load beside the CPU build of torch. Its planning,
preprocessing, trainer and predictor need neither timm nor torchvision, so on the CPU:

    python3 -m venv /tmp/nnunet_env
    /tmp/nnunet_env/bin/pip install torch==2.13.0                  # the CPU build
    /tmp/nnunet_env/bin/pip install --no-deps nnunetv2 dynamic-network-architectures
    /tmp/nnunet_env/bin/pip install acvl-utils batchgenerators batchgeneratorsv2 einops tqdm scipy \
        scikit-learn scikit-image SimpleITK pandas graphviz tifffile requests nibabel matplotlib seaborn \
        imagecodecs yacs blosc2

(pip then warns that dynamic-network-architectures wants timm; nothing used here imports it.)
The harness takes that Python from --nnunet_python or the NNUNET_PYTHON environment variable.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

PEER = "nnU-Net v2"
STEPS_SCRIPT = Path(__file__).resolve().with_name("nnunet_v2_steps.py")
DATASET_ID = 900
FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def find_python(python: str | None) -> tuple[str | None, str]:
    """(the peer's Python, "") when nnU-Net v2 imports there, else (None, why it is skipped)."""
    python = python or os.environ.get("NNUNET_PYTHON")
    if not python:
        return None, "not installed here: give --nnunet_python or NNUNET_PYTHON (see benchmarks/nnunet_v2.py)"
    if not Path(python).is_file():
        return None, f"{python} does not exist"
    check = subprocess.run([python, "-c", "import nnunetv2, torch; print(torch.__version__)"], capture_output=True,
                           text=True, check=False)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"nnunetv2 does not import with {python}: {last}"
    return python, ""


def environment(workdir: Path) -> dict[str, str]:
    """This process's environment with nnU-Net's three folders under `workdir` (created)."""
    env = dict(os.environ)
    for name in FOLDERS:
        (workdir / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(workdir / name)
    return env


def convert_task(task_dir: Path, raw_root: Path, dataset_id: int = DATASET_ID) -> str:
    """Write an MSD task (training cases) in nnU-Net v2's raw layout; returns the dataset name.

    v2 keeps one 3D file per channel (`<case>_0000.nii.gz`, ...) and maps label names to values in its
    dataset.json. Header and affine are kept, so both tools read the same geometry.
    """
    dataset = json.loads((task_dir / "dataset.json").read_text())
    name = f"Dataset{dataset_id:03d}_{task_dir.name.split('_', 1)[-1]}"
    target = raw_root / name
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(parents=True, exist_ok=True)
    for entry in dataset["training"]:
        image = nib.load(task_dir / entry["image"])
        case_id = Path(entry["image"]).name[: -len(".nii.gz")]
        data = np.asanyarray(image.dataobj)
        channels = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[-1])]
        for index, channel in enumerate(channels):
            nib.save(nib.Nifti1Image(channel, image.affine, image.header),
                     target / "imagesTr" / f"{case_id}_{index:04d}.nii.gz")
        label = nib.load(task_dir / entry["label"])
        nib.save(label, target / "labelsTr" / f"{case_id}.nii.gz")
    v2 = {"channel_names": {str(k): v for k, v in dataset["modality"].items()},
          "labels": {v: int(k) for k, v in dataset["labels"].items()},
          "numTraining": len(dataset["training"]), "file_ending": ".nii.gz"}
    (target / "dataset.json").write_text(json.dumps(v2, indent=2))
    return name


def preprocess_command(python: str, dataset_id: int, n_jobs: int) -> list[str]:
    """nnUNetv2_plan_and_preprocess for the 3d_fullres configuration with `n_jobs` processes."""
    entry = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
             "plan_and_preprocess_entry as main; sys.exit(main())")
    return [python, "-c", entry, "-d", str(dataset_id), "-c", "3d_fullres", "-np", str(n_jobs), "-npfp",
            str(n_jobs), "--no_pbar"]


def network_spec(config: dict, kernels: Sequence, strides: Sequence, filters: Sequence[int],
                 batch_size: int) -> dict:
    """The network part of a spec for nnunet_v2_steps.py: a plan's patch, spacing, channels, classes and levels."""
    return {"patch_size": list(config["patch_size"]), "spacing": list(config["spacing"]),
            "in_channels": config["in_channels"], "n_class": config["n_class"], "kernels": [list(k) for k in kernels],
            "strides": [list(s) for s in strides], "filters": list(filters), "batch_size": batch_size}


def time_steps(python: str, spec: dict, workdir: Path, timeout: float | None = None) -> list[float]:
    """Run nnunet_v2_steps.py with `spec` in the peer's Python; the seconds of each timed step or case."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"spec_{spec['mode']}.json"
    path.write_text(json.dumps({**spec, "workdir": str(workdir)}))
    result = subprocess.run([python, str(STEPS_SCRIPT), str(path)], capture_output=True, text=True, check=False,
                            env=environment(workdir), timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{PEER} {spec['mode']} steps failed (exit {result.returncode}):\n{tail}")
    return json.loads(lines[-1])["seconds"]
