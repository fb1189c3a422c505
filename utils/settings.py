"""Typed settings: what each part of the program is told, and nothing more.

The command line (`utils.args`) is turned into these at the entry point; packages receive only the
settings they use. `NetworkPlan` is the network part of a task's plan (`config.json`), stored in every
checkpoint, so a checkpoint alone rebuilds its network (data_preprocessing/network_plan.py explains the
fields and the presets that choose them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Real

KINDS = ("unet", "resenc_unet")
NORMS = ("instance", "batch", "group")
TARGETS = ("labels", "regions", "brats")
# Command-line flags that override the plan's network for one run (data_preprocessing.network_plan).
NETWORK_OVERRIDES = ("filters", "depth", "min_fmap", "res_block", "norm", "negative_slope", "deep_supervision",
                     "deep_supr_num")


def _lists(value):
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    return value


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class NetworkPlan:
    """Every argument of the U-Net (`nnunet.network.build_network`).

    Attributes:
        kind: "unet" (plain convolutions) or "resenc_unet" (residual encoder blocks after a one-convolution stem).
        features: channels per stage, finest first.
        kernels: convolution kernel per stage, (D, H, W) or (H, W).
        strides: downsampling into each stage; `strides[0]` is all ones.
        encoder_blocks: blocks per encoder stage: convolutions (unet) or residual blocks of two (resenc_unet).
        decoder_blocks: convolutions per decoder stage (every stage but the deepest), finest first.
        norm: "instance" (affine), "batch" or "group".
        negative_slope: of every LeakyReLU (0: ReLU).
        deep_supervision_heads: extra outputs of the coarser decoder stages in training (0: none).
    """

    kind: str
    features: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    encoder_blocks: tuple[int, ...]
    decoder_blocks: tuple[int, ...]
    norm: str = "instance"
    negative_slope: float = 0.01
    deep_supervision_heads: int = 0

    @property
    def n_stages(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return len(self.kernels[0])

    def to_dict(self) -> dict:
        """The plan as JSON values (lists instead of tuples)."""
        return {key: _lists(value) for key, value in asdict(self).items()}

    def replace(self, **changes) -> NetworkPlan:
        """A copy with some fields changed, checked again."""
        return replace(self, **changes).checked()

    @classmethod
    def from_dict(cls, value: object, where: str = "the plan") -> NetworkPlan:
        """Read and check a plan's "network" object.

        Raises:
            ValueError: one line naming `where` and the field that is missing or wrong.
        """
        if not isinstance(value, dict):
            raise ValueError(f"{where}: 'network' must be an object, got {value!r}")
        required = ("kind", "features", "kernels", "strides", "encoder_blocks", "decoder_blocks")
        missing = [key for key in required if key not in value]
        if missing:
            raise ValueError(f"{where}: 'network' has no {', '.join(repr(key) for key in missing)}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown 'network' key(s) {', '.join(repr(key) for key in unknown)}")
        try:
            plan = cls(
                kind=value["kind"],
                features=tuple(value["features"]),
                kernels=tuple(tuple(kernel) for kernel in value["kernels"]),
                strides=tuple(tuple(stride) for stride in value["strides"]),
                encoder_blocks=tuple(value["encoder_blocks"]),
                decoder_blocks=tuple(value["decoder_blocks"]),
                norm=value.get("norm", "instance"),
                negative_slope=value.get("negative_slope", 0.01),
                deep_supervision_heads=value.get("deep_supervision_heads", 0),
            )
        except TypeError:
            raise ValueError(f"{where}: the 'network' lists must hold integers (kernels and strides: lists of "
                             f"integers), got {value!r}") from None
        return plan.checked(where)

    def checked(self, where: str = "the plan") -> NetworkPlan:
        """This plan, if its fields agree with each other; else a one-line ValueError naming the field."""
        n = self.n_stages
        if self.kind not in KINDS:
            raise ValueError(f"{where}: network 'kind' must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if n < 2:
            raise ValueError(f"{where}: the network needs at least 2 stages, 'features' lists {n}")
        if not all(_count(f) for f in self.features):
            raise ValueError(f"{where}: network 'features' must be positive integers, got {list(self.features)}")
        for key in ("kernels", "strides", "encoder_blocks"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{where}: network '{key}' needs one entry per stage ({n}, as 'features'), "
                                 f"got {len(getattr(self, key))}")
        if len(self.decoder_blocks) != n - 1:
            raise ValueError(f"{where}: network 'decoder_blocks' needs one entry per decoder stage ({n - 1}), "
                             f"got {len(self.decoder_blocks)}")
        dim = len(self.kernels[0])
        if dim not in (2, 3):
            raise ValueError(f"{where}: network kernels must have 2 or 3 axes, got {list(self.kernels[0])}")
        for key in ("kernels", "strides"):
            for level, entry in enumerate(getattr(self, key)):
                if len(entry) != dim or not all(_count(size) for size in entry):
                    raise ValueError(f"{where}: network '{key}' entry {level} must be {dim} positive integers, "
                                     f"got {list(entry)}")
        if any(size % 2 == 0 for kernel in self.kernels for size in kernel):
            raise ValueError(f"{where}: network kernels must have odd sizes, got {_lists(self.kernels)}")
        if any(stride != 1 for stride in self.strides[0]):
            raise ValueError(f"{where}: the first stage keeps full resolution: network strides[0] must be all 1, "
                             f"got {list(self.strides[0])}")
        if not all(_count(b) for b in (*self.encoder_blocks, *self.decoder_blocks)):
            raise ValueError(f"{where}: network block counts must be positive integers")
        if self.norm not in NORMS:
            raise ValueError(f"{where}: network 'norm' must be one of {', '.join(NORMS)}, got {self.norm!r}")
        slope = self.negative_slope
        if not isinstance(slope, Real) or isinstance(slope, bool) or not 0 <= slope < 1:
            raise ValueError(f"{where}: network 'negative_slope' must be a number in [0, 1), got {slope!r}")
        heads = self.deep_supervision_heads
        if not isinstance(heads, int) or isinstance(heads, bool) or not 0 <= heads <= n - 2:
            raise ValueError(f"{where}: network 'deep_supervision_heads' must be an integer from 0 to {n - 2} "
                             f"for {n} stages, got {heads!r}")
        return self


@dataclass(frozen=True)
class ModelSettings:
    """What is trained: the network, its outputs and its loss. Stored in checkpoints.

    Attributes:
        network: the network's plan (the task plan's, with the run's command-line overrides).
        dim: 2 or 3, the network's dimension.
        targets: "labels" (softmax over classes), "regions" (sigmoid over the regions of dataset.json) or
            "brats" (sigmoid over whole tumour, tumour core and enhancing tumour).
        focal: Dice + focal loss instead of Dice + cross-entropy (label targets).
    """

    network: NetworkPlan
    dim: int
    targets: str = "labels"
    focal: bool = False

    def to_dict(self) -> dict:
        return {"network": self.network.to_dict(), "dim": self.dim, "targets": self.targets, "focal": self.focal}

    @classmethod
    def from_dict(cls, value: dict, where: str) -> ModelSettings:
        """Raises ValueError (one line naming `where`) for missing or wrong entries."""
        if not isinstance(value, dict) or value.get("targets") not in TARGETS or value.get("dim") not in (2, 3):
            raise ValueError(f"{where}: model settings must name 'dim' (2 or 3) and 'targets' "
                             f"({', '.join(TARGETS)}), got {value!r}")
        return cls(NetworkPlan.from_dict(value.get("network"), where), value["dim"], value["targets"],
                   bool(value.get("focal", False)))


@dataclass(frozen=True)
class OptimSettings:
    """Optimiser, learning-rate schedule and the epochs they run over (`nnunet.schedules`)."""

    optimizer: str = "adam"
    learning_rate: float = 8e-4
    momentum: float = 0.99
    weight_decay: float = 1e-4
    scheduler: str = "none"
    lr_warmup_epochs: int = 0
    warmup_start_lr: float = 0.0
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    lr_patience: int = 10
    epochs: int = 1000
    eval_every: int = 1
    skip_first_n_eval: int = 0


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window inference and what prediction writes."""

    overlap: float = 0.5
    blend: str = "gaussian"
    batch_size: int = 4
    tta: bool = False
    save_preds: bool = False
    save_probs: bool = False
    overlay: bool = False
    results: str = "/results"
    output_format: str = "nifti"  # labels as "nifti", "dicom-seg" (DICOM input only) or "both"
    dicom_channels: tuple[str, ...] = ()  # the SeriesDescription of each channel of DICOM input
    stitch_device: str = "auto"  # prediction's score volume: "auto", "gpu" or "cpu" (nnunet.inference)


@dataclass(frozen=True)
class DeviceSettings:
    """Where and in which precision the run computes (`nnunet.trainer`)."""

    gpus: int = 0
    accelerator: str | None = None
    nodes: int = 1
    cpu_processes: int = 1
    amp: bool = False
    amp_dtype: str | None = None  # "fp16" or "bf16"; None: fp16 on CUDA, bf16 on the CPU

    @property
    def kind(self) -> str:
        """The accelerator named: "cpu", "gpu" (CUDA) or another Lightning accelerator's name."""
        name = (self.accelerator or ("gpu" if self.gpus > 0 else "cpu")).lower()
        return "gpu" if name == "cuda" else name

    @property
    def cuda_devices(self) -> int:
        """GPUs for the DALI pipelines: those of `gpus` on CUDA; none (the CPU) for any other accelerator."""
        return max(self.gpus, 1) if self.kind == "gpu" else 0


@dataclass(frozen=True)
class LoaderSettings:
    """What the data module reads and how it samples (`data_loading.data_module`).

    Attributes:
        data: the preprocessed task folder (or a val/ or test/ folder below it when predicting).
        mode: "train", "evaluate" or "predict": which cases are read.
        dim: the network's dimension (None: the task's).
        batch_size: training patches per step and process (prediction benchmark: patches per step); None: the
            task plan's.
        rotation: rotation and scaling augmentation.
        cuda_devices: GPUs the pipelines may use (0: the CPU pipelines).
        predict_fold: predict with a task folder as `data`: its validation cases of `fold` (with their labels)
            rather than its test/ cases.
        benchmark: patches without augmentation, `warmup` + `train_batches` (or `test_batches`) per epoch.
    """

    data: str
    mode: str = "train"
    dim: int | None = None
    fold: int = 0
    nfolds: int = 5
    batch_size: int | None = None
    nvol: int | None = 4  # None: 4, or the largest count below it that divides the batch size
    oversampling: float = 0.4
    rotation: bool = True
    num_workers: int = 1
    seed: int | None = None
    cuda_devices: int = 0
    predict_fold: bool = False
    benchmark: bool = False
    warmup: int = 0
    train_batches: int = 0
    test_batches: int = 0

    def replace(self, **changes) -> LoaderSettings:
        return replace(self, **changes)


@dataclass(frozen=True)
class TrainingSettings:
    """What a training run does besides optimising: stopping, checkpoints, logs (`nnunet.modes.train`)."""

    results: str = "/results"
    logname: str = "logs.json"
    patience: int = 100
    min_epochs: int = 0
    save_ckpt: bool = False
    resume: bool = False
    ckpt_path: str | None = None
    seed: int | None = None
    gradient_clip_val: float = 0.0
    quality_threshold: float | None = None
    log_line: str = "nnunet"
    mlperf_log: str | None = None
    loggers: tuple[str, ...] = ()  # Lightning experiment loggers: "tensorboard", "csv", "mlflow"
    params: dict = field(default_factory=dict)  # every command-line value, written to params.json


@dataclass(frozen=True)
class BenchmarkSettings:
    """What benchmark mode times (`nnunet.benchmark`).

    Attributes:
        mode: "train" (full training steps) or "predict" (forward passes).
        steps: timed steps after `warmup` untimed ones.
        batch_size: patches per step (None: the task plan's).
        task: an MSD task number: random volumes with its published plan instead of the data.
        ckpt_path: time this checkpoint's network instead of the plan's.
    """

    mode: str = "train"
    warmup: int = 1
    steps: int = 0
    batch_size: int | None = None
    dim: int | None = None
    seed: int | None = None
    task: str | None = None
    ckpt_path: str | None = None
    results: str = "/results"
    logname: str = "logs.json"
