"""Prediction of a large CT scan, and of many smaller ones, end to end: ours, an older checkout of ours, MONAI,
nnU-Net v2; wall time and peak memory of each command's whole process tree, in one run.

    python benchmarks/large_scan.py [--shape 512 512 600] [--small_shape 256 256 200] [--cases 10]
        [--before ../older_checkout] [--nnunet_python /tmp/nnunet_env/bin/python] [--tta off on] [--output r.json]

The data, written once into --scratch (X Y Z order, 0.8 x 0.8 x 1.0 mm, one CT channel, int16 Hounsfield-like
values: air, a soft-tissue body, a spine, two ellipsoid organs that are the labels 1 and 2):
  * a training task, --train_cases cases of --train_shape in the MSD layout, preprocessed with our
    preprocess.py: every case is at the scan's spacing, so the plan's spacing is the scan's and nothing is
    resampled, neither in preprocessing nor in prediction;
  * a network of that plan trained as `main.py --exec_mode train --save_ckpt` trains it (`main.main`, in this
    process, not measured) for --epochs epochs of --train_batches steps: briefly trained weights, since what is
    measured is the cost of prediction, not its Dice. --filters is small (8 16 32 64, then doubling to the
    plan's depth: 128 for the 5 stages of the default --train_shape; nnU-Net's are 32 64 128 256 320) so that
    prediction of a 512 x 512 x 600 scan is a matter of minutes, not hours, on two CPU cores; the network's
    cost per voxel shrinks with it, the cost of everything else (reading, normalising, stitching, inverting,
    writing) and the memory it takes do not;
  * the scan of --shape, and --cases scans of --small_shape, to predict.

Each command runs in a fresh process, measured from outside (benchmarks/measure.run_measured):
  * ours: `python main.py --exec_mode predict --ckpt_path CKPT --input DIR --results R --save_preds --gpus 0
    [--tta]`;
  * ours before: the same command from the checkout given by --before (a git worktree of an older commit, run
    with this Python), so that a change is measured against its parent on the same machine in the same run;
  * MONAI: benchmarks/large_scan_monai.py, the same network from the same checkpoint in a MONAI pipeline
    (LoadImaged ... sliding_window_inference ... Invertd, SaveImaged; see that file);
  * nnU-Net v2: `nnUNetv2_predict_from_modelfolder -device cpu -npp 1 -nps 1 [--disable_tta]` with a model
    folder written by benchmarks/large_scan_nnunet.py. Matched: patch size, spacing, kernels, strides, channels
    per stage, two convolutions per stage, instance norm, LeakyReLU, CT normalisation with our plan's
    statistics, overlap 0.5, gaussian blending, the 8 flips with TTA. Not matched: the weights (random, from
    nnU-Net's own initialisation; its PlainConvUNet cannot load ours), one window per forward pass (ours and
    MONAI: 4), and its own reading (SimpleITK), cropping and resampling code.
The --cases scans are predicted by one command per tool, without TTA; ours and ours before run through
benchmarks/large_scan_steps.py, which is main.py plus a callback that also reports the sum of the per-case
prediction steps (Lightning's predict step: inference, and inverting and writing where they are not done in the
background while the next case runs; without reading and preprocessing).

Printed: one table of every tool and setting (wall s, peak MiB), then the comparisons in the harness's form
(benchmarks/measure.format_table): the peer's figure over ours, > 1 when ours is faster or smaller. A peer not
given or not installed is skipped with a note; one run per command, in the order ours, before, MONAI, nnU-Net v2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import nnunet_v2  # noqa: E402
from benchmarks.measure import Comparison, format_table, run_measured  # noqa: E402
from utils.args import Formatter, positive_int  # noqa: E402
from utils.io import save_json  # noqa: E402

MIB = 2**20
SPACING = (0.8, 0.8, 1.0)  # (sx, sy, sz) mm
TASK_NUMBER = "55"
TASK = f"Task{TASK_NUMBER}_LargeScan"
LABELS = {"0": "background", "1": "liver", "2": "kidney"}
PEERS = ("before", "monai", "nnunet")
NAMES = {"ours": "ours", "before": "ours before", "monai": "MONAI", "nnunet": nnunet_v2.PEER}
NNUNET_PREDICT = ("import sys; from nnunetv2.inference.predict_from_raw_data import "
                  "predict_entry_point_modelfolder as main; sys.exit(main())")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    parser.add_argument("--shape", type=positive_int, nargs=3, default=[512, 512, 600], help="the large scan (X Y Z)")
    parser.add_argument("--small_shape", type=positive_int, nargs=3, default=[256, 256, 200],
                        help="each of the --cases scans (X Y Z)")
    parser.add_argument("--cases", type=int, default=10, help="scans of --small_shape predicted in one command "
                                                              "(0: none)")
    parser.add_argument("--tta", choices=["off", "on"], nargs="+", default=["off", "on"],
                        help="settings for the large scan: without and with flip test-time augmentation")
    parser.add_argument("--peers", choices=PEERS, nargs="*", default=list(PEERS), help="what to run beside ours")
    parser.add_argument("--before", default=None, help="an older checkout of this project (peer 'before')")
    parser.add_argument("--nnunet_python", default=None,
                        help="Python with nnunetv2 (default: $NNUNET_PYTHON; see benchmarks/nnunet_v2.py)")
    parser.add_argument("--train_cases", type=positive_int, default=4, help="cases of the training task")
    parser.add_argument("--train_shape", type=positive_int, nargs=3, default=[96, 96, 64],
                        help="shape of a training case (X Y Z); the plan's patch follows from it")
    parser.add_argument("--filters", type=positive_int, nargs="+", default=[8, 16, 32, 64],
                        help="channels of the network's first levels, doubling beyond them (small, for the CPU)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="training epochs")
    parser.add_argument("--train_batches", type=positive_int, default=2, help="training steps per epoch")
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds allowed to each command")
    parser.add_argument("--scratch", default=None, help="working folder, kept (default: a temporary one, removed)")
    parser.add_argument("--output", default=None, help="also write every measurement to this JSON file")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Synthetic CT
# ---------------------------------------------------------------------------------------------
def ct_volume(shape: list[int], seed: int, slab: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like scan, int16 (X, Y, Z), and its label, uint8 (X, Y, Z): 0 background, 1 and 2 two organs.

    Air (-1000) around an elliptic body (40) with a spine (700) and two ellipsoid organs (60 and 150), plus
    Gaussian noise (sd 15). Built `slab` slices at a time, so that float32 temporaries stay small.
    """
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    x_size, y_size, z_size = shape
    u = ((np.arange(x_size, dtype=np.float32) + 0.5) / x_size * 2 - 1).reshape(-1, 1, 1)
    v = ((np.arange(y_size, dtype=np.float32) + 0.5) / y_size * 2 - 1).reshape(1, -1, 1)
    body = ((u / 0.85) ** 2 + (v / 0.65) ** 2 < 1)[..., 0]
    spine = (((u / 0.08) ** 2 + ((v - 0.45) / 0.08) ** 2) < 1)[..., 0]
    # (label, HU, centre, radii) in coordinates of -1..1 across each axis
    organs = [(1, 60.0, (-0.3, -0.05, 0.1), (0.35, 0.3, 0.45)), (2, 150.0, (0.35, 0.15, -0.1), (0.15, 0.15, 0.3))]
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    for start in range(0, z_size, slab):
        stop = min(z_size, start + slab)
        w = ((np.arange(start, stop, dtype=np.float32) + 0.5) / z_size * 2 - 1).reshape(1, 1, -1)
        values = np.empty((x_size, y_size, stop - start), dtype=np.float32)
        values[:] = np.where(body, np.float32(40), np.float32(-1000))[..., None]
        values[spine] = 700
        for value, hu, centre, radii in organs:
            inside = sum(((axis - np.float32(c + s)) / np.float32(r)) ** 2
                         for axis, c, s, r in zip((u, v, w), centre, shift, radii)) < 1
            values[inside] = hu
            label[..., start:stop][inside] = value
        values += rng.standard_normal(values.shape, dtype=np.float32) * np.float32(15)
        image[..., start:stop] = np.clip(np.rint(values), -1024, 3071)
    return image, label


def save_nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0])), str(path))


def write_training_task(root: Path, cases: int, shape: list[int]) -> Path:
    """`cases` CT cases with labels in the MSD layout, `root/Task55_LargeScan`."""
    task = root / TASK
    for sub in ("imagesTr", "labelsTr"):
        (task / sub).mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(cases):
        name = f"train_{index:03d}"
        image, label = ct_volume(shape, seed=index)
        save_nifti(task / "imagesTr" / f"{name}.nii.gz", image)
        save_nifti(task / "labelsTr" / f"{name}.nii.gz", label)
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    dataset = {"name": "LargeScan", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": LABELS,
               "numTraining": cases, "training": entries, "test": []}
    (task / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return task


def write_scans(folder: Path, count: int, shape: list[int], prefix: str, seed: int) -> list[str]:
    """`count` scans `<prefix>_NNN.nii.gz` in `folder`, and the same files as `<case>_0000.nii.gz` (links) in
    `folder`_nnunet for nnU-Net v2's naming; returns the case ids."""
    linked = folder.with_name(folder.name + "_nnunet")
    folder.mkdir(parents=True, exist_ok=True)
    linked.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(count):
        case = f"{prefix}_{index:03d}"
        if not (folder / f"{case}.nii.gz").is_file():
            image, _ = ct_volume(shape, seed=seed + index)
            save_nifti(folder / f"{case}.nii.gz", image)
            del image
        link = linked / f"{case}_0000.nii.gz"
        if not link.exists():
            link.symlink_to(folder / f"{case}.nii.gz")
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def stage_filters(filters: list[int], stages: int) -> list[int]:
    """Channels of each of the plan's `stages`: `filters`, cut or continued by doubling (at most 320, as nnU-Net)."""
    result = list(filters[:stages])
    while len(result) < stages:
        result.append(min(2 * result[-1], 320))
    return result


def train_checkpoint(scratch: Path, args: argparse.Namespace) -> Path:
    """Preprocess the training task as preprocess.py does and train briefly as main.py does, both in this process;
    the checkpoint (made once per --scratch)."""
    from data_preprocessing.preprocessor import preprocess_task

    checkpoint = scratch / "train" / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        return checkpoint
    if not (scratch / "raw" / TASK / "dataset.json").is_file():
        write_training_task(scratch / "raw", args.train_cases, args.train_shape)
    data = scratch / "preprocessed" / f"{TASK_NUMBER}_3d"
    if not (data / "config.json").is_file():
        preprocess_task(scratch / "raw", scratch / "preprocessed", TASK_NUMBER, dim=3)
    config = json.loads((data / "config.json").read_text())
    spacing = config["spacing"]
    if not np.allclose(spacing, SPACING[::-1]):
        raise RuntimeError(f"the plan's spacing {spacing} is not the scans' {list(SPACING[::-1])} (D, H, W)")
    import main as entry

    argv = ["--exec_mode", "train", "--data", str(data), "--results", str(scratch / "train"), "--gpus", "0",
            "--nfolds", "2", "--fold", "0", "--epochs", str(args.epochs), "--train_batches", str(args.train_batches),
            "--batch_size", "2", "--seed", "0", "--save_ckpt", "--filters",
            *map(str, stage_filters(args.filters, len(config["network"]["strides"])))]
    # In this process (not measured): one interpreter start less; its lines would bury the table.
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = entry.main(argv)
    if code != 0 or not checkpoint.is_file():
        tail = "\n".join(log.getvalue().strip().splitlines()[-8:])
        raise RuntimeError(f"training the benchmark's network failed (exit {code}):\n{tail}")
    return checkpoint


def nnunet_model(python: str, checkpoint: Path, folder: Path) -> Path:
    """An nnU-Net v2 model folder with our checkpoint's plan and network shape (random weights)."""
    from nnunet.checkpoints import read_checkpoint, stored_settings

    config, model, _ = stored_settings(read_checkpoint(checkpoint), checkpoint)
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    network = model.network
    spec = {**nnunet_v2.network_spec(config, network.kernels, network.strides, network.features, 2),
            "ct": {key: config["normalization"][0][key] for key in ("mean", "std", "clip_low", "clip_high")}}
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / "nnunet_spec.json"
    path.write_text(json.dumps(spec))
    result = subprocess.run([python, str(ROOT / "benchmarks" / "large_scan_nnunet.py"), str(path), str(folder)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"writing the nnU-Net v2 model folder failed:\n{tail}")
    return folder


# ---------------------------------------------------------------------------------------------
# Running the tools
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One measured command: which tool (and its name in the tables) and setting, wall time (s), peak memory (MiB),
    the per-case prediction steps (s) where reported, and why there are no figures."""

    tool: str
    name: str
    setting: str
    seconds: float | None = None
    peak_mib: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.seconds is not None


def command_for(tool: str, checkpoint: Path, inputs: Path, out: Path, tta: bool, timed_steps: bool,
                before: Path | None, nnunet: tuple[str, Path] | None) -> tuple[list[str], Path, Path]:
    """(argument list, working folder, folder the labels land in) of one tool's prediction command."""
    if tool in ("ours", "before"):
        checkout = ROOT if tool == "ours" else before
        main_args = ["--exec_mode", "predict", "--ckpt_path", str(checkpoint), "--input", str(inputs),
                     "--results", str(out), "--save_preds", "--gpus", "0", *(["--tta"] if tta else [])]
        if timed_steps:
            command = [sys.executable, str(ROOT / "benchmarks" / "large_scan_steps.py"), str(checkout), *main_args]
        else:
            command = [sys.executable, str(checkout / "main.py"), *main_args]
        return command, checkout, out / "predictions"
    if tool == "monai":
        command = [sys.executable, str(ROOT / "benchmarks" / "large_scan_monai.py"), "--ckpt_path", str(checkpoint),
                   "--input", str(inputs), "--output", str(out), *(["--tta"] if tta else [])]
        return command, ROOT, out
    python, model = nnunet
    command = [python, "-c", NNUNET_PREDICT, "-i", str(inputs.with_name(inputs.name + "_nnunet")), "-o", str(out),
               "-m", str(model), "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar",
               *([] if tta else ["--disable_tta"])]
    return command, ROOT, out


def check_labels(folder: Path, cases: list[str], shape: list[int]) -> str:
    """'' when every case has a `<case>.nii.gz` of `shape`, else what is wrong."""
    import nibabel as nib

    for case in cases:
        path = folder / f"{case}.nii.gz"
        if not path.is_file():
            return f"no prediction {path.name} in {folder}"
        found = list(nib.load(str(path)).shape)
        if found != list(shape):
            return f"{path.name} has shape {found}, the scan {list(shape)}"
    return ""


def measure(tool: str, name: str, setting: str, command: list[str], cwd: Path, labels: Path, cases: list[str],
            shape: list[int], timeout: float, env: dict | None = None) -> Run:
    """Run one command from a clean output folder; its figures, or a note saying why there are none."""
    print(f"  {name}, {setting} ...", flush=True)
    result = run_measured(command, env=env, cwd=str(cwd), timeout=timeout)
    run = Run(tool, name, setting)
    lines = result.output.strip().splitlines()
    if result.returncode != 0 and result.seconds >= timeout:
        run.note = f"stopped at the --timeout of {timeout:.0f} s, peak {result.peak_rss / MIB:.0f} MiB by then"
        return run
    if result.returncode != 0:
        run.note = f"failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}"
        return run
    problem = check_labels(labels, cases, shape)
    if problem:
        run.note = problem
        return run
    run.seconds, run.peak_mib = result.seconds, result.peak_rss / MIB
    steps = [line for line in lines if line.startswith("STEPS ")]
    if steps:
        run.step_seconds = json.loads(steps[-1][len("STEPS "):])
    print(f"    {run.seconds:.1f} s, {run.peak_mib:.0f} MiB", flush=True)
    return run


def shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def comparisons(runs: list[Run], settings: list[str]) -> list[Comparison]:
    """Ours against each peer, per setting, on wall time and peak memory."""
    found = {(run.tool, run.setting): run for run in runs}
    result = []
    for setting in settings:
        ours = found.get(("ours", setting))
        for peer in PEERS:
            theirs = found.get((peer, setting))
            if theirs is None:
                continue
            for measure_name, attribute in (("wall s", "seconds"), ("peak MiB", "peak_mib")):
                item = Comparison(setting, measure_name, theirs.name, note=theirs.note)
                if ours is not None and ours.ok:
                    item.ours.append(getattr(ours, attribute))
                    if theirs.ok:
                        item.theirs.append(getattr(theirs, attribute))
                result.append(item)
    return result


def figures_table(runs: list[Run]) -> str:
    """Every run: tool, setting, wall s, peak MiB, and the sum of per-case prediction steps where reported."""
    header = f"{'tool':<16} {'setting':<28} {'wall s':>9} {'peak MiB':>9} {'steps s':>9}  note"
    rows = [header, "-" * len(header)]
    for run in runs:
        seconds = f"{run.seconds:9.1f}" if run.ok else f"{'-':>9}"
        peak = f"{run.peak_mib:9.0f}" if run.ok else f"{'-':>9}"
        steps = f"{sum(run.step_seconds):9.1f}" if run.step_seconds else f"{'-':>9}"
        rows.append(f"{run.name:<16} {run.setting:<28} {seconds} {peak} {steps}  {run.note}".rstrip())
    return "\n".join(rows)


def checkout_commit(path: Path) -> str:
    result = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or "unknown commit"


def run(args: argparse.Namespace, scratch: Path) -> tuple[list[Run], list[str], dict]:
    """Write the data, train, and measure every tool; (runs, settings in order, facts about the setup)."""
    started = time.perf_counter()
    checkpoint = train_checkpoint(scratch, args)
    config = json.loads((scratch / "preprocessed" / f"{TASK_NUMBER}_3d" / "config.json").read_text())
    large = write_scans(scratch / "large", 1, args.shape, "scan", seed=100)
    many = write_scans(scratch / "many", args.cases, args.small_shape, "case", seed=200) if args.cases else []
    filters = stage_filters(args.filters, len(config["network"]["strides"]))
    facts = {"patch_size": config["patch_size"], "spacing_dhw": config["spacing"], "filters": filters,
             "setup_seconds": time.perf_counter() - started, "checkpoint": str(checkpoint)}
    print(f"setup: plan spacing {config['spacing']} mm (D, H, W) = the scans' (no resampling), patch "
          f"{config['patch_size']}, filters {facts['filters']}; {facts['setup_seconds']:.0f} s", flush=True)

    tools = ["ours", *(peer for peer in PEERS if peer in args.peers)]
    skipped: dict[str, str] = {}
    before = Path(args.before).resolve() if args.before else None
    if "before" in tools and before is None:
        skipped["before"] = "not run: give --before, an older checkout of this project"
    elif before is not None and not (before / "main.py").is_file():
        skipped["before"] = f"not run: {before} has no main.py"
    names = dict(NAMES)
    if before is not None and "before" not in skipped:
        names["before"] = f"before {checkout_commit(before)}"
        facts["before"] = str(before)
    nnunet = None
    if "nnunet" in tools:
        python, why = nnunet_v2.find_python(args.nnunet_python)
        if python:
            nnunet = (python, nnunet_model(python, checkpoint, scratch / "nnunet_v2" / "model"))
        else:
            skipped["nnunet"] = f"not run: {why}"
    env = nnunet_v2.environment(scratch / "nnunet_v2") if nnunet else None

    runs: list[Run] = []
    plans = [(f"{shape_text(args.shape)}, tta {tta}", scratch / "large", large, args.shape, tta == "on", False)
             for tta in args.tta]
    if many:
        plans.append((f"{len(many)} x {shape_text(args.small_shape)}", scratch / "many", many, args.small_shape,
                      False, True))
    for setting, inputs, cases, shape, tta, many_cases in plans:
        print(f"[{setting}]", flush=True)
        for tool in tools:
            if tool in skipped:
                runs.append(Run(tool, names[tool], setting, note=skipped[tool]))
                continue
            out = scratch / "out" / f"{tool}_{setting.replace(' ', '').replace(',', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            command, cwd, labels = command_for(tool, checkpoint, inputs, out, tta, many_cases, before, nnunet)
            runs.append(measure(tool, names[tool], setting, command, cwd, labels, cases, shape, args.timeout,
                                env if tool == "nnunet" else None))
    return runs, [setting for setting, *_ in plans], facts


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="nnunet_large_scan_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        runs, settings, facts = run(args, scratch)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
               f"torch threads, torch {torch.__version__}, python {platform.python_version()}")
    compared = comparisons(runs, settings)
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine}; patch {facts['patch_size']}, filters {facts['filters']}, "
          f"spacing {list(SPACING)} mm (X Y Z), one run per command")
    print(figures_table(runs))
    print()
    print(format_table(compared))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "argv": sys.argv[1:] if argv is None
              else argv, "shape": args.shape, "small_shape": args.small_shape, "cases": args.cases, **facts,
              "runs": [asdict(run) for run in runs],
              "comparisons": [item.as_dict() for item in compared]}
    if args.output:
        save_json(args.output, report)
    return report


if __name__ == "__main__":
    main()
