"""The flags of NVIDIA's reference nnU-Net (PyTorch) that are named differently here, or have no meaning here.

A reference command line runs unchanged: a renamed flag sets ours (`ALIASES`), and a flag with no meaning here
stops the run in one line that says why and what to use instead (`REFUSED`). README.md has the table of every
reference flag, its default there and ours.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# Reference flag -> (our flag, argparse keywords of the value it takes).
ALIASES: dict[str, tuple[str, dict]] = {
    "--max_epochs": ("--epochs", {"type": int}),
    "--steps": ("--lr_steps", {"type": int, "nargs": "+"}),
    "--factor": ("--lr_gamma", {"type": float}),
    "--residual": ("--res_block", {"nargs": 0}),
    "--val_mode": ("--blend", {"choices": ["gaussian", "constant"]}),
    "--num_nodes": ("--nodes", {"type": int}),
}

# Reference flag -> why it has no meaning here and what to use instead (the one-line error).
REFUSED: dict[str, str] = {
    "--accumulate_grad_batches": "is not supported: raise --batch_size, or train on more --gpus",
    "--sync_batchnorm": "is not supported: the plan's instance norm needs no synchronisation across GPUs",
    "--create_idx": "has no meaning here: the loader reads the .npy files, there are no TFRecord indices",
    "--profile": "is not built in: time steps with --benchmark (scripts/benchmark.py) and profile with nsys",
    "--affinity": "is left to the launcher: run under numactl or taskset",
    "--more_chn": "is not supported: set the features per stage with --filters",
    "--invert_resampled_y": "has no meaning here: predictions always go back to the source image grid",
    "--ckpt_store_dir": "is not supported: checkpoints are written to RESULTS/checkpoints, choose it with --results",
    "--data2d_dim": "has no meaning here: 2D training slices the volumes preprocessed with --dim 2",
}
# Reference --optimizer choices that have no counterpart here.
REFUSED_OPTIMIZERS = {"fused_adam": "use --optimizer adam (PyTorch picks its fused or multi-tensor kernel)"}


class _Refused(argparse.Action):
    """A reference flag with no meaning here: one line that says why, with or without a value."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        kwargs.update(nargs="*", default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} (a reference nnU-Net flag) {REFUSED[option_string]}")


class _Alias(argparse.Action):
    """A reference flag that sets one of ours."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def optimizer_name(value: str) -> str:
    """--optimizer's value; the reference's fused_adam is refused with the one to use."""
    if value in REFUSED_OPTIMIZERS:
        raise argparse.ArgumentTypeError(f"{value} (a reference nnU-Net optimizer) is not offered: "
                                         f"{REFUSED_OPTIMIZERS[value]}")
    return value


def add_reference_flags(parser: argparse.ArgumentParser) -> None:
    """The reference's names for our flags, `--min_epochs`, and its flags that have no meaning here."""
    group = parser.add_argument_group(
        "reference nnU-Net flags", "NVIDIA's reference names, accepted so its commands run unchanged (README.md: "
                                   "'Coming from the reference nnU-Net')")
    group.add_argument("--min_epochs", type=int, default=0,
                       help="train at least this many epochs before early stopping (--patience) may end the run")
    for flag, (ours, keywords) in ALIASES.items():
        group.add_argument(flag, action=_Alias, dest=ours.lstrip("-"), help=f"the same as {ours}", **keywords)
    for flag, reason in REFUSED.items():
        group.add_argument(flag, action=_Refused, dest=f"reference_{flag.lstrip('-')}", metavar="VALUE",
                           help=f"not accepted: {reason.split(': ', 1)[-1]}")
