"""The GPU checks in one run, each step with its own time limit, summed up in one table.

    python benchmarks/gpu/check.py --gpu [--output DIR]     on a machine with CUDA (check.sh installs first)
    python benchmarks/gpu/check.py --cpu [--output DIR]     the same steps with tiny sizes on the CPU
    python benchmarks/gpu/check.py --gpu --dry_run          the commands, nothing run

Steps: the training benchmark, 3D 128^3 patches with 4 channels (MSD task 01's
plan) at batch 2 with --amp in fp16 and in bf16, with its peak GPU memory; the prediction benchmark at batch 1
and 4 in both dtypes; the DALI training loader on the GPU, 128^3 patches of 4 channels, in patches/s and as a
multiple of the training step's demand; the CUDA tests (tests/gpu); the demo task end to end (download --task
00, preprocess, a short training, prediction of the validation fold, evaluate.py). The table (step, figure,
unit, status) is printed last and written to DIR/table.md; every step's output goes to DIR/check.log, the
figures to DIR/results.json. DIR defaults to $OUT when set, else results/gpu_check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Targets on one H200 (benchmarks/gpu/README.md).
TRAIN_TARGET = 90.0  # img/s, 3D 128^3, batch 2, --amp
PREDICT_TARGET = 250.0  # img/s, 3D 128^3, --amp
LOADER_FACTOR_TARGET = 3.0  # loader patches/s over the training step's demand


@dataclass
class Step:
    """One command of the check with its time limit; `figures` reads (name, value, unit) rows from its results."""

    name: str
    command: list[str]
    timeout: float
    results: Path | None = None
    figures: list = field(default_factory=list)  # callables: (step) -> list[tuple[str, value, unit]]
    needs_cuda: bool = False
    output: str = ""  # what it printed, once run
    seconds: float = 0.0  # its wall time, once run


@dataclass
class Sizes:
    """What the steps run on: the real sizes on the GPU, tiny ones for a rehearsal on the CPU."""

    gpus: str
    task: str  # MSD plan of the benchmarks
    filters: list[str]
    train_steps: tuple[int, int]  # warmup, timed
    predict_steps: tuple[int, int]
    loader_case: tuple[int, int, int]
    loader_patch: tuple[int, int, int]
    loader_steps: tuple[int, int]
    loader_cases: int
    demo_cases: int
    demo_size: int
    demo_epochs: int
    demo_batches: int
    workers: int
    pytest_timeout: float
    budget: float


GPU = Sizes(gpus="1", task="01", filters=[], train_steps=(20, 60), predict_steps=(20, 100),
            loader_case=(144, 144, 144), loader_patch=(128, 128, 128), loader_steps=(10, 60), loader_cases=8,
            demo_cases=32, demo_size=64, demo_epochs=6, demo_batches=25, workers=8, pytest_timeout=170, budget=430)
CPU = Sizes(gpus="0", task="04", filters=["--filters", "8", "16", "32", "64"], train_steps=(1, 2),
            predict_steps=(1, 2), loader_case=(40, 40, 40), loader_patch=(32, 32, 32), loader_steps=(1, 4),
            loader_cases=2, demo_cases=8, demo_size=32, demo_epochs=1, demo_batches=2, workers=2,
            pytest_timeout=120, budget=600)


def perf(step: Step) -> dict:
    return json.loads((step.results / "perf.json").read_text())


def throughput(unit: str):
    return lambda step: [("", perf(step)["throughput"], unit)]


def peak_memory(step: Step) -> list:
    peak = perf(step).get("peak_memory_mib")
    return [("peak GPU memory", peak, "MiB")] if peak is not None else []


def pytest_counts(step: Step) -> list:
    text = step.output
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text)}
    return [("passed", counts.get("passed", 0), "tests"), ("failed", counts.get("failed", 0) + counts.get(
        "error", 0) + counts.get("errors", 0), "tests"), ("skipped", counts.get("skipped", 0), "tests")]


def mean_dice(step: Step) -> list:
    match = re.search(r"^mean Dice (\d\.\d+)", step.output, re.MULTILINE)
    return [("mean Dice", float(match.group(1)), "")] if match else []


def build_steps(sizes: Sizes, work: Path, cpu: bool) -> list[Step]:
    main = [PYTHON, str(ROOT / "main.py")]
    steps = []
    for dtype in ("fp16", "bf16"):
        results = work / f"train_{dtype}"
        steps.append(Step(
            f"train b2 {dtype}", [*main, "--benchmark", "--exec_mode", "train", "--task", sizes.task, "--dim", "3",
                                  "--gpus", sizes.gpus, "--batch_size", "2", "--amp", "--amp_dtype", dtype,
                                  "--warmup", str(sizes.train_steps[0]), "--train_batches", str(sizes.train_steps[1]),
                                  "--seed", "0", "--results", str(results), *sizes.filters],
            90, results, [throughput("img/s"), peak_memory], needs_cuda=dtype == "fp16"))
    for batch in ("1", "4"):
        for dtype in ("fp16", "bf16"):
            results = work / f"predict_b{batch}_{dtype}"
            steps.append(Step(
                f"predict b{batch} {dtype}",
                [*main, "--benchmark", "--exec_mode", "predict", "--task", sizes.task, "--dim", "3", "--gpus",
                 sizes.gpus, "--batch_size", batch, "--amp", "--amp_dtype", dtype, "--warmup",
                 str(sizes.predict_steps[0]), "--test_batches", str(sizes.predict_steps[1]), "--seed", "0",
                 "--results", str(results), *sizes.filters],
                60, results, [throughput("img/s")], needs_cuda=dtype == "fp16"))
    loader_data, results = work / "loader_task", work / "loader"
    steps.append(Step("loader task", [PYTHON, "-c", (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.loader import write_synthetic_task as w; p = Path(sys.argv[2]); p.mkdir(parents=True); "
        "w(p, int(sys.argv[3]), [int(s) for s in sys.argv[4:7]], [int(s) for s in sys.argv[7:10]])"),
        str(ROOT), str(loader_data), str(sizes.loader_cases), *map(str, sizes.loader_case),
        *map(str, sizes.loader_patch)], 60))
    steps.append(Step("DALI loader", [PYTHON, str(ROOT / "scripts" / "benchmark.py"), "--mode", "loader", "--data",
                                      str(loader_data), "--dim", "3", "--gpus", sizes.gpus, "--batch_size", "2",
                                      "--nfolds", "1", "--oversampling", "0.4", "--num_workers", str(sizes.workers),
                                      "--warmup", str(sizes.loader_steps[0]), "--train_batches",
                                      str(sizes.loader_steps[1]), "--seed", "0", "--results", str(results)],
                      90, results, [throughput("patches/s")]))
    steps.append(Step("tests/gpu", [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     str(ROOT / "tests" / "gpu")], sizes.pytest_timeout, figures=[pytest_counts]))
    demo = work / "demo"
    raw, data, task = demo / "raw", demo / "data", demo / "data" / "00_3d"
    amp = ["--amp"] if not cpu else []
    steps += [
        Step("demo download", [PYTHON, str(ROOT / "download.py"), "--task", "00", "--data", str(raw), "--n_cases",
                               str(sizes.demo_cases), "--size", str(sizes.demo_size), "--n_test", "2"], 30),
        *[Step(f"demo preprocess {mode}", [PYTHON, str(ROOT / "preprocess.py"), "--task", "00", "--dim", "3",
                                           "--data", str(raw), "--results", str(data), "--n_jobs",
                                           str(sizes.workers), "--exec_mode", mode], 45)
          for mode in ("training", "val")],
        Step("demo train", [*main, "--exec_mode", "train", "--data", str(task), "--results", str(demo / "results"),
                            "--gpus", sizes.gpus, *amp, "--fold", "0", "--epochs", str(sizes.demo_epochs),
                            "--train_batches", str(sizes.demo_batches), "--filters", "16", "32", "64", "128",
                            "--learning_rate", "3e-3", "--seed", "0", "--save_ckpt", "--num_workers",
                            str(sizes.workers)], 120),
        Step("demo predict", [*main, "--exec_mode", "predict", "--data", str(task / "val"), "--fold", "0",
                              "--results", str(demo / "validation"), "--gpus", sizes.gpus, *amp, "--ckpt_path",
                              str(demo / "results" / "checkpoints" / "best.ckpt"), "--save_preds", "--num_workers",
                              str(sizes.workers)], 60),
        Step("demo evaluate", [PYTHON, str(ROOT / "evaluate.py"), "--preds",
                               str(demo / "validation" / "predictions"), "--lbls",
                               str(raw / "Task00_Synthetic" / "labelsTr"), "--dataset_json",
                               str(raw / "Task00_Synthetic" / "dataset.json"), "--predicted_only"],
             30, figures=[mean_dice]),
    ]
    return steps


def run_step(step: Step, timeout: float, log) -> str:
    """Run one step, append its output to the log; returns its status."""
    log.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
    log.flush()
    began = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        step.output, status = done.stdout, "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        step.output = output.decode(errors="replace") if isinstance(output, bytes) else output
        status = f"timed out ({timeout:.0f} s)"
    step.seconds = time.perf_counter() - began
    log.write(step.output)
    log.write(f"----- {step.name}: {status} in {step.seconds:.1f} s\n")
    log.flush()
    return status


def format_table(rows: list[tuple[str, object, str, str]]) -> str:
    lines = ["| step | figure | unit | status |", "|---|---|---|---|"]
    for name, value, unit, status in rows:
        shown = f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))
        lines.append(f"| {name} | {shown} | {unit} | {status} |")
    return "\n".join(lines)


def derived_rows(figures: dict[str, float]) -> list[tuple[str, object, str, str]]:
    """Targets met or not, and the loader against the training step's demand."""
    rows = []
    for name, target in (("train b2 fp16", TRAIN_TARGET), ("train b2 bf16", TRAIN_TARGET),
                         ("predict b1 fp16", PREDICT_TARGET), ("predict b1 bf16", PREDICT_TARGET),
                         ("predict b4 fp16", PREDICT_TARGET), ("predict b4 bf16", PREDICT_TARGET)):
        if name in figures:
            rows.append((f"{name} / target {target:.0f}", figures[name] / target, "x",
                         "met" if figures[name] >= target else "below"))
    demand = max((figures[n] for n in ("train b2 fp16", "train b2 bf16") if n in figures), default=None)
    if demand and "DALI loader" in figures:
        factor = figures["DALI loader"] / demand
        rows.append(("DALI loader / fastest training demand", factor, "x",
                     "met" if factor >= LOADER_FACTOR_TARGET else f"below {LOADER_FACTOR_TARGET:.0f}x"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpu", action="store_true", help="the real sizes on one CUDA GPU")
    where.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (a rehearsal of the script)")
    parser.add_argument("--output", default=os.environ.get("OUT") or str(ROOT / "results" / "gpu_check"),
                        help="folder of check.log, table.md and results.json")
    parser.add_argument("--work", default=None, help="scratch folder of the steps' data (default: a temporary one)")
    parser.add_argument("--steps", nargs="+", default=None, help="run only the steps whose names start so")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 430 on the GPU)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and the table, run nothing")
    args = parser.parse_args(argv)
    sizes = CPU if args.cpu else GPU
    budget = args.budget or sizes.budget
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work)
    else:
        scratch = Path(tempfile.gettempdir())
        work = scratch / "gpu_check" if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu_check_", dir=scratch))
    steps = build_steps(sizes, work, args.cpu)
    if args.cpu:  # tiny sizes, but a CPU shared with other work may be slow
        for step in steps:
            step.timeout *= 3
    if args.steps:
        steps = [s for s in steps if any(s.name.startswith(prefix) for prefix in args.steps)]
    rows: list[tuple[str, object, str, str]] = []
    earlier = output / "steps.tsv"  # written by check.sh: the wheel installation
    if earlier.is_file():
        for line in earlier.read_text().splitlines():
            name, value, unit, status = line.split("\t")
            rows.append((name, float(value), unit, status))
    figures: dict[str, float] = {}
    results: dict[str, dict] = {}
    deadline = time.perf_counter() + budget
    with open(output / "check.log", "a") as log:
        for step in steps:
            left = deadline - time.perf_counter()
            if args.dry_run:
                print(" ".join(step.command))
                status = "planned"
            elif args.cpu and step.needs_cuda:
                status = "skipped: fp16 autocast is CUDA only"
            elif left < 5:
                status = "skipped: out of time"
            else:
                status = run_step(step, min(step.timeout, left), log)
            found = []
            for read in step.figures if status.startswith(("ok", "failed")) else []:
                try:
                    found += read(step)
                except (OSError, ValueError, KeyError) as error:
                    status = f"{status}, no figure ({type(error).__name__})"
            if not status.startswith("ok"):  # a failed test run still counts its tests
                rows.append((step.name, None, "", status))
                rows += [(f"{step.name} {label}", value, unit, "") for label, value, unit in found if label]
                continue
            # The step's row holds its main figure (or its wall time); other figures follow on rows of their own.
            main_figure = [(value, unit) for label, value, unit in found if not label]
            value, unit = main_figure[0] if main_figure else (round(step.seconds, 1), "s")
            rows.append((step.name, value, unit, f"{status} ({step.seconds:.0f} s)" if main_figure else status))
            if main_figure:
                figures[step.name] = value
            rows += [(f"{step.name} {label}", value, unit, "ok") for label, value, unit in found if label]
            if step.results is not None and (step.results / "perf.json").is_file():
                results[step.name] = perf(step)
    rows += derived_rows(figures)
    table = format_table(rows)
    (output / "table.md").write_text(table + "\n")
    (output / "results.json").write_text(json.dumps({"mode": "cpu" if args.cpu else "gpu", "figures": figures,
                                                     "records": results}, indent=2))
    if not args.work and not args.dry_run:
        shutil.rmtree(work, ignore_errors=True)
    print(table, flush=True)
    return 0 if all(row[3].startswith(("ok", "met", "planned", "below", "skipped: fp16")) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
