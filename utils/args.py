"""The command-line surface of every entry point, defined in one place.

`main.py`, `preprocess.py`, `download.py`, `evaluate.py` and the wrappers in `scripts/` build
their parsers here, so a flag means the same thing wherever it appears.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from utils.errors import UserError
from utils.reference_flags import add_reference_flags, optimizer_name
from utils.settings import (
    NETWORK_OVERRIDES,
    BenchmarkSettings,
    DeviceSettings,
    InferenceSettings,
    LoaderSettings,
    OptimSettings,
    TrainingSettings,
)
from utils.task_folders import task_folder


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return number


def probability(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return number


def overlap_fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected an overlap in [0, 1), got {value}")
    return number


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults next to each flag's help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default is None or action.default is False:
            return help_text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Command-line errors in one line that names the flag and where the flags are listed, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# main.py
# ---------------------------------------------------------------------------------------------
def main_parser() -> argparse.ArgumentParser:
    parser = Parser(
        description="Train, evaluate, predict or benchmark an nnU-Net on a preprocessed task.",
        formatter_class=Formatter,
    )

    run = parser.add_argument_group("run")
    run.add_argument("--exec_mode", choices=["train", "evaluate", "predict"], default="train",
                     help="train a model, validate a checkpoint on its fold, or predict test cases")
    run.add_argument("--data", default="/data",
                     help="the data root holding the preprocessed tasks (with --task), or one preprocessed task "
                          "folder such as /data/01_3d (default: /data)")
    run.add_argument("--task", default=None,
                     help="the task in --data, as preprocess.py named it: --task 01 --dim 3 trains on DATA/01_3d "
                          "(also 005, kits19, a 2D image set's name); with --benchmark and no such folder, random "
                          "volumes with MSD task NN's plan (default: --data is the task folder)")
    run.add_argument("--results", default="/results", help="folder for checkpoints, logs and predictions")
    run.add_argument("--logname", default="logs.json", help="name of the DLLogger-format log in --results")
    run.add_argument("--logger", nargs="+", choices=["tensorboard", "csv", "mlflow"], default=[],
                     help="experiment loggers besides the DLLogger log, writing under --results: tensorboard/, "
                          "csv/metrics.csv, mlruns/ (no server: `mlflow ui --backend-store-uri sqlite:///RESULTS/mlruns/mlflow.db`)")
    run.add_argument("--gpus", type=non_negative_int, default=None,
                     help="GPUs per node, 0 runs on the CPU; with --accelerator, its devices per node (default: 1 "
                          "with CUDA, else 0)")
    run.add_argument("--accelerator", default=None,
                     help="a Lightning accelerator (cpu, gpu, mps, xpu, ...); default: gpu with --gpus > 0, else "
                          "cpu. Accelerators other than CUDA and the CPU run in FP32 with the data pipelines on "
                          "the CPU")
    run.add_argument("--nodes", type=positive_int, default=1, help="number of machines (torchrun or SLURM)")
    run.add_argument("--cpu_processes", type=positive_int, default=1,
                     help="with --gpus 0: data-parallel processes on the CPU (DDP over gloo)")
    run.add_argument("--seed", type=int, default=None, help="random seed for reproducible runs")
    run.add_argument("--amp", action="store_true",
                     help="mixed precision in the dtype of --amp_dtype: by default fp16 autocast with a gradient "
                          "scaler on CUDA and bf16 autocast on the CPU")
    run.add_argument("--amp_dtype", choices=["fp16", "bf16"], default=None,
                     help="with --amp: the autocast dtype; fp16 (with a gradient scaler) is CUDA only, bf16 runs on "
                          "CUDA (no scaler) and the CPU (default: fp16 on CUDA, bf16 on the CPU)")
    run.add_argument("--num_workers", type=positive_int, default=default_workers(),
                     help="DALI worker threads per process")
    run.add_argument("--dim", type=int, choices=[2, 3], default=None,
                     help="2D or 3D network (default: the dimension the data was preprocessed for)")

    data = parser.add_argument_group("data")
    data.add_argument("--nfolds", type=positive_int, default=5, help="number of cross-validation folds")
    data.add_argument("--fold", type=non_negative_int, default=None,
                      help="fold used for validation (default 0); predict: with a task folder as --data, predict "
                           "this fold's validation cases instead of test/")
    data.add_argument("--batch_size", type=positive_int, default=None,
                      help="training batch size per GPU (default: the task plan's batch_size)")
    data.add_argument("--val_batch_size", type=positive_int, default=4,
                      help="patches per forward pass in sliding-window inference")
    data.add_argument("--nvol", type=positive_int, default=None,
                      help="2D only: volumes sampled per training batch, each giving batch_size/nvol slices (default: "
                           "4, or the largest number below 4 that divides the batch size)")
    data.add_argument("--oversampling", type=probability, default=0.4,
                      help="probability that a training patch holds foreground")
    data.add_argument("--no_rotation", action="store_true",
                      help="turn off the rotation and scaling augmentation")

    model = parser.add_argument_group(
        "model", "The network is the task plan's (config.json: 'network'); these flags override it for one run. "
                 "With --ckpt_path the checkpoint's network is used, and a flag that contradicts it is an error.")
    model.add_argument("--filters", type=positive_int, nargs="+", default=None,
                       help="features per stage (the plan's by default: 32, 64, 128, ... doubling, capped at 320 in "
                            "3D and 512 in 2D)")
    model.add_argument("--depth", type=positive_int, default=None,
                       help="plan the kernels and strides again with at most this many stages")
    model.add_argument("--min_fmap", type=positive_int, default=None,
                       help="plan the kernels and strides again, downsampling no axis below this size (the plan "
                            "uses 4)")
    model.add_argument("--norm", choices=["instance", "batch", "group"], default=None,
                       help="normalization layer (the plan's: instance)")
    model.add_argument("--negative_slope", type=float, default=None,
                       help="LeakyReLU negative slope (the plan's: 0.01)")
    model.add_argument("--res_block", action="store_true",
                       help="residual encoder blocks (a plain plan gets one residual block per stage)")
    model.add_argument("--deep_supervision", action="store_true",
                       help="losses on the coarser decoder outputs (the plan's heads, else 2)")
    model.add_argument("--deep_supr_num", type=positive_int, default=None,
                       help="number of extra decoder outputs used by deep supervision")
    model.add_argument("--focal", action="store_true", help="Dice + focal loss instead of Dice + cross-entropy")
    model.add_argument("--brats", action="store_true",
                       help="BraTS: train on the regions whole tumour, tumour core and enhancing tumour")
    model.add_argument("--regions", action="store_true",
                       help="train on the hierarchical regions declared in dataset.json (sigmoid outputs)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=1000, help="maximum number of epochs")
    optim.add_argument("--optimizer", type=optimizer_name, choices=["sgd", "adam", "adamw", "radam"], default="adam",
                       help="optimizer")
    optim.add_argument("--learning_rate", type=positive_float, default=8e-4, help="initial learning rate")
    optim.add_argument("--momentum", type=non_negative_float, default=0.99, help="SGD momentum (Nesterov)")
    optim.add_argument("--weight_decay", type=non_negative_float, default=1e-4, help="weight decay")
    optim.add_argument("--scheduler", choices=["none", "cosine", "poly", "multistep", "plateau"], default="none",
                       nargs="?", const="cosine", help="learning-rate schedule; a bare --scheduler is cosine")
    optim.add_argument("--lr_warmup_epochs", type=non_negative_int, default=0,
                       help="epochs of linear warmup from --warmup_start_lr before the schedule (any --scheduler "
                            "but plateau)")
    optim.add_argument("--warmup_start_lr", type=non_negative_float, default=0.0,
                       help="learning rate the warmup starts from; it reaches --learning_rate in its last epoch")
    optim.add_argument("--lr_steps", type=positive_int, nargs="+", default=None,
                       help="multistep: epochs at which the learning rate is multiplied by --lr_gamma, counted "
                            "after --lr_warmup_epochs")
    optim.add_argument("--lr_gamma", type=positive_float, default=0.1,
                       help="multistep and plateau: factor applied to the learning rate")
    optim.add_argument("--lr_patience", type=non_negative_int, default=10,
                       help="plateau: evaluations without improvement before the learning rate drops")
    optim.add_argument("--gradient_clip_val", type=non_negative_float, default=0.0,
                       help="clip the gradient norm to this value (0: no clipping)")
    optim.add_argument("--patience", type=positive_int, default=100,
                       help="stop after this many evaluations without a better mean Dice")

    evaluation = parser.add_argument_group("evaluation and prediction")
    evaluation.add_argument("--eval_every", type=positive_int, default=1, help="validate every N epochs")
    evaluation.add_argument("--skip_first_n_eval", type=non_negative_int, default=0,
                            help="skip validation in the first N epochs")
    evaluation.add_argument("--quality_threshold", type=probability, default=None,
                            help="stop training after the evaluation whose mean Dice reaches this value "
                                 "(MLPerf UNet3D: 0.908)")
    evaluation.add_argument("--log_line", choices=["nnunet", "mlperf"], default="nnunet",
                            help="per-epoch line on stdout; mlperf: the MLPerf UNet3D reference's (L1 dice, "
                                 "L2 dice, mean_dice, eval_loss, train_loss and TOP_* at the best evaluation)")
    evaluation.add_argument("--mlperf_log", default=None,
                            help="also write MLPerf-compliant events to this file (needs mlperf-logging)")
    evaluation.add_argument("--overlap", type=overlap_fraction, default=0.5,
                            help="overlap of neighbouring sliding windows")
    evaluation.add_argument("--blend", choices=["gaussian", "constant"], default="gaussian",
                            help="weighting of overlapping windows")
    evaluation.add_argument("--tta", action="store_true", help="test-time augmentation over all flips")
    evaluation.add_argument("--stitch_device", choices=["auto", "gpu", "cpu"], default="auto",
                            help="prediction: where the windows' half-precision scores of a whole case are summed; "
                                 "auto: on the GPU when it has room, else in host memory")
    evaluation.add_argument("--save_preds", action="store_true", help="write predictions as NIfTI")
    evaluation.add_argument("--save_probs", action="store_true",
                            help="also write class probabilities (float16, compressed)")
    evaluation.add_argument("--overlay", action="store_true",
                            help="write a PNG per case with the prediction's contours over the image")
    evaluation.add_argument("--input", default=None,
                            help="predict a folder of raw NIfTI images, or of DICOM series (one series per subfolder "
                                 "or mixed), preprocessing them on the fly")
    evaluation.add_argument("--output_format", choices=["nifti", "dicom-seg", "both"], default="nifti",
                            help="predict: write labels as <case>.nii.gz, as a DICOM SEG <case>.dcm referencing the "
                                 "source series (DICOM --input only), or both; dicom-seg and both imply --save_preds")
    evaluation.add_argument("--dicom_channels", nargs="+", default=None, metavar="NAME",
                            help="DICOM --input: the series of each channel, one name per channel, matched per study "
                                 "against SeriesDescription (contains the name, ignoring case; an exact match wins); "
                                 "default for several channels: the task's channel names")

    checkpoint = parser.add_argument_group("checkpoints")
    checkpoint.add_argument("--save_ckpt", action="store_true",
                            help="save last.ckpt and the best checkpoint by mean Dice")
    checkpoint.add_argument("--ckpt_path", default=None,
                            help="checkpoint to evaluate, predict with, or start training from")
    checkpoint.add_argument("--resume_training", action="store_true",
                            help="continue training from --ckpt_path (default: results/checkpoints/last.ckpt)")

    package = parser.add_argument_group(
        "model package", "Predict raw images (--input) with a model package (scripts/select_model.py): the mean of "
                         "every fold's probabilities, then the package's postprocessing; labels are always written.")
    package.add_argument("--model", default=None, help="the model package folder to predict with")
    package.add_argument("--folds", type=non_negative_int, nargs="+", default=None,
                         help="with --model: predict with these folds of the package only (default: all of them)")
    package.add_argument("--save_uncertainty", action="store_true",
                         help="with --model: also write <case>_entropy.nii.gz (entropy of the ensemble's "
                              "probabilities, nats) and <case>_disagreement.nii.gz (fraction of the networks whose "
                              "labels differ from the ensemble's), float32")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true", help="time training or prediction steps")
    bench.add_argument("--warmup", type=non_negative_int, default=1,
                       help="benchmark: steps run before timing starts")
    bench.add_argument("--train_batches", type=non_negative_int, default=0,
                       help="batches per training epoch (0: the whole training set); timed steps in benchmark")
    bench.add_argument("--test_batches", type=non_negative_int, default=0,
                       help="batches per validation or prediction (0: all); timed steps in benchmark")
    add_reference_flags(parser)
    return parser


def parse_main_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = main_parser().parse_args(argv)
    if args.dim == 2 and args.exec_mode == "train" and args.batch_size and args.nvol and args.batch_size % args.nvol:
        main_parser().error(f"--batch_size {args.batch_size} must be a multiple of --nvol {args.nvol} in 2D")
    if args.amp_dtype is not None and not args.amp:
        main_parser().error(f"--amp_dtype {args.amp_dtype} needs --amp")
    return args


# ---------------------------------------------------------------------------------------------
# main.py's arguments as the settings each package receives
# ---------------------------------------------------------------------------------------------
def device_settings(args: argparse.Namespace) -> DeviceSettings:
    """The device settings. An unset --gpus (None) is the CPU here: the entry points first set it to its default,
    1 with CUDA, else 0 (`nnunet.trainer.default_gpus`), where the device is chosen."""
    gpus = 0 if args.gpus is None else args.gpus
    return DeviceSettings(gpus=gpus, accelerator=args.accelerator, nodes=args.nodes,
                          cpu_processes=args.cpu_processes, amp=args.amp, amp_dtype=args.amp_dtype)


def loader_settings(args: argparse.Namespace, mode: str | None = None) -> LoaderSettings:
    """The data module's settings; `mode` ("train", "evaluate", "predict") defaults to --exec_mode. --data and
    --task are resolved to the preprocessed task folder here (`data_source`)."""
    return LoaderSettings(
        data=data_source(args)[0], mode=mode or args.exec_mode, dim=args.dim, fold=args.fold or 0,
        nfolds=args.nfolds, predict_fold=args.fold is not None,
        batch_size=args.batch_size, nvol=args.nvol, oversampling=args.oversampling, rotation=not args.no_rotation,
        num_workers=args.num_workers, seed=args.seed, cuda_devices=device_settings(args).cuda_devices,
        benchmark=args.benchmark, warmup=args.warmup, train_batches=args.train_batches,
        test_batches=args.test_batches)


def data_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The preprocessed task folder that --data and --task address, and the MSD task whose plan a benchmark
    draws random volumes with (None: the benchmark reads the folder). With --benchmark, a --task that addresses
    no preprocessed folder is the random-volume benchmark of that task's plan.

    Raises:
        UserError: no such task folder (without --benchmark); the message names the folders that exist.
    """
    try:
        return str(task_folder(args.data, args.task, args.dim)), None
    except UserError:
        if args.benchmark and args.task is not None:
            return args.data, args.task
        raise


def optim_settings(args: argparse.Namespace) -> OptimSettings:
    return OptimSettings(
        optimizer=args.optimizer, learning_rate=args.learning_rate, momentum=args.momentum,
        weight_decay=args.weight_decay, scheduler=args.scheduler, lr_warmup_epochs=args.lr_warmup_epochs,
        warmup_start_lr=args.warmup_start_lr, lr_steps=tuple(args.lr_steps or ()), lr_gamma=args.lr_gamma,
        lr_patience=args.lr_patience, epochs=args.epochs, eval_every=args.eval_every,
        skip_first_n_eval=args.skip_first_n_eval)


def inference_settings(args: argparse.Namespace) -> InferenceSettings:
    return InferenceSettings(overlap=args.overlap, blend=args.blend, batch_size=args.val_batch_size, tta=args.tta,
                             save_preds=args.save_preds or args.output_format != "nifti", save_probs=args.save_probs,
                             overlay=args.overlay, results=args.results, output_format=args.output_format,
                             dicom_channels=tuple(args.dicom_channels or ()), stitch_device=args.stitch_device)


def training_settings(args: argparse.Namespace) -> TrainingSettings:
    return TrainingSettings(
        results=args.results, logname=args.logname, patience=args.patience, save_ckpt=args.save_ckpt,
        resume=args.resume_training, ckpt_path=args.ckpt_path, seed=args.seed, min_epochs=args.min_epochs,
        gradient_clip_val=args.gradient_clip_val, quality_threshold=args.quality_threshold, log_line=args.log_line,
        mlperf_log=args.mlperf_log, loggers=tuple(args.logger), params=dict(vars(args)))


def benchmark_settings(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(
        mode=args.exec_mode, warmup=args.warmup,
        steps=args.train_batches if args.exec_mode == "train" else args.test_batches, batch_size=args.batch_size,
        dim=args.dim, seed=args.seed, task=data_source(args)[1], ckpt_path=args.ckpt_path, results=args.results,
        logname=args.logname)


def check_package_flags(args: argparse.Namespace) -> None:
    """--model and its flags go together, with --exec_mode predict and --input, without --ckpt_path.

    Raises:
        UserError: one line naming the flag and the fix.
    """
    if args.model is None:
        for flag, given in (("--folds", args.folds is not None), ("--save_uncertainty", args.save_uncertainty)):
            if given:
                raise UserError(f"{flag} needs --model, the model package to predict with")
        return
    if args.exec_mode != "predict" or args.benchmark:
        raise UserError("--model predicts raw images: use it with --exec_mode predict, without --benchmark")
    if args.ckpt_path:
        raise UserError("--model and --ckpt_path both name the networks to predict with; give one of them")
    if not args.input:
        raise UserError("--model needs --input, the folder (or image file) of raw images to predict")
    if args.overlay:
        raise UserError("--overlay is not available with --model; drop it")
    given = model_flags(args)
    if given:
        raise UserError(f"--model takes its networks from the package; drop {', '.join('--' + k for k in given)}")


def check_dicom_flags(args: argparse.Namespace) -> None:
    """--output_format dicom-seg/both and --dicom_channels belong to --exec_mode predict with --input.

    Raises:
        UserError: one line naming the flag and the fix.
    """
    given = [flag for flag, value in (("--output_format " + args.output_format, args.output_format != "nifti"),
                                      ("--dicom_channels", args.dicom_channels is not None)) if value]
    if given and (args.exec_mode != "predict" or args.benchmark or not args.input):
        raise UserError(f"{given[0]} needs --exec_mode predict with --input, a folder of DICOM series")


def targets(args: argparse.Namespace) -> str:
    """What the network's outputs are: "brats", "regions" or "labels"."""
    return "brats" if args.brats else "regions" if args.regions else "labels"


def model_flags(args: argparse.Namespace) -> dict:
    """The model flags given on the command line (those left at their defaults are absent): the network
    overrides, dim, targets and focal."""
    flags = {key: getattr(args, key) for key in NETWORK_OVERRIDES if getattr(args, key) not in (None, False)}
    if args.dim is not None:
        flags["dim"] = args.dim
    if args.brats or args.regions:
        flags["targets"] = targets(args)
    if args.focal:
        flags["focal"] = True
    return flags


# ---------------------------------------------------------------------------------------------
# preprocess.py
# ---------------------------------------------------------------------------------------------
def preprocess_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Crop, resample and normalise a raw task (MSD, nnU-Net v2, KiTS19 or a folder of 2D images) "
                    "into NumPy volumes for training or inference.",
        formatter_class=Formatter,
    )
    parser.add_argument("--task", required=True,
                        help="task number (TaskNN_* first, then DatasetNNN_*), a task folder name such as "
                             "Task05_Prostate or Dataset005_Prostate, or kits19")
    parser.add_argument("--dim", type=int, choices=[2, 3], default=None,
                        help="plan for a 2D or a 3D network (default: the --plan's; else 2 for 2D images, 3 otherwise)")
    parser.add_argument("--exec_mode", choices=["training", "val", "test"], default="training",
                        help="training: imagesTr with labels; val: imagesTr without labels; test: imagesTs")
    parser.add_argument("--data", default="/data", help="folder that holds the raw TaskNN_Name folders")
    parser.add_argument("--results", default="/data", help="output root; the task goes to RESULTS/NN_3d or NN_2d")
    parser.add_argument("--n_jobs", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="cases preprocessed in parallel (one case per worker in memory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="plan the task again and redo every case; config.json is replaced, so edits to it are "
                             "lost (pass the edited file with --plan to keep them)")
    parser.add_argument("--plan", default=None,
                        help="a plan (a task's config.json, possibly edited) to preprocess with instead of planning")
    parser.add_argument("--planner", choices=["default", "resenc_m", "resenc_l", "resenc_xl"], default=None,
                        help="the network preset: default, nnU-Net's plain U-Net; resenc_m/l/xl, residual-encoder "
                             "U-Nets whose patch and batch fit about 8, 24 or 40 GB of GPU memory (default: the "
                             "existing plan's, else default; another preset plans the task again)")
    parser.add_argument("--kits_recipe", choices=["final", "v1.0"], default="final",
                        help="kits19: the MLPerf rules; final: 1.6x1.2x1.2 mm, all cases; v1.0: 1.6x1.0x1.0 mm "
                             "without cases 15, 23, 37, 68, 125, 133")
    return parser


# ---------------------------------------------------------------------------------------------
# download.py
# ---------------------------------------------------------------------------------------------
def download_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fetch a Medical Segmentation Decathlon task (01-10), or write the synthetic task 00 offline.",
        formatter_class=Formatter,
    )
    parser.add_argument("--task", required=True, help="00 (synthetic, offline) or 01-10 (MSD)")
    parser.add_argument("--data", default="/data", help="folder that receives TaskNN_Name")
    parser.add_argument("--keep", action="store_true", help="keep the downloaded archive after extraction")
    parser.add_argument("--mirror", default=None,
                        help="base URL to fetch archives from instead of the public location")
    synthetic = parser.add_argument_group("synthetic task 00")
    synthetic.add_argument("--seed", type=int, default=0, help="seed of the synthetic task")
    synthetic.add_argument("--n_cases", type=positive_int, default=32, help="training cases")
    synthetic.add_argument("--n_test", type=non_negative_int, default=4, help="test cases (imagesTs)")
    synthetic.add_argument("--size", type=positive_int, default=64, help="edge of a volume in voxels (about)")
    return parser


# ---------------------------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------------------------
def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Score NIfTI predictions against labels: per-case and per-class Dice (and HD95).",
        formatter_class=Formatter,
    )
    parser.add_argument("--preds", required=True, help="folder of predicted <case>.nii.gz")
    parser.add_argument("--lbls", required=True, help="folder of label <case>.nii.gz")
    parser.add_argument("--hd95", action="store_true",
                        help="also the 95th-percentile Hausdorff distance in mm, by default the larger of the two "
                             "directed 95th percentiles of surface distances (MONAI's definition; see --hd95_mode)")
    parser.add_argument("--hd95_mode", choices=["max", "pooled"], default="max",
                        help="how --hd95 combines its two directions: max, the larger directed 95th percentile "
                             "(MONAI); pooled, the 95th percentile of both directions' distances together (medpy, "
                             "nnU-Net v1), never larger. The CSV and JSON outputs name the one used")
    parser.add_argument("--output", default=None,
                        help="path prefix for the CSV and JSON results (default: PREDS/evaluation)")
    parser.add_argument("--dataset_json", default=None,
                        help="dataset.json whose \"labels\" give the classes and their names "
                             "(default: the non-zero values found in the label files)")
    parser.add_argument("--predicted_only", action="store_true",
                        help="score only the labels that have a prediction, e.g. one validation fold of labelsTr")
    parser.add_argument("--report", action="store_true",
                        help="also write PREFIX.html: a self-contained page with the sortable table, the "
                             "distributions per class and the best, median and worst cases")
    parser.add_argument("--images", default=None,
                        help="with --report: folder of the images predicted (<case>.nii.gz or <case>_0000.nii.gz), "
                             "to draw the cases over them")
    parser.add_argument("--results", default=None,
                        help="with --report: a training results folder, whose logs.json gives the learning curves")
    return parser
