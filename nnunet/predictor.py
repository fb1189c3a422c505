"""Prediction with a model package: raw scans (files or arrays) to labels, by the fold ensemble and postprocessing.

    predictor = Predictor.from_package("/results/package", folds=[0, 2], device="cuda", tta=True)
    for prediction in predictor.predict("/data/Task04_Hippocampus/imagesTs", probabilities=True):
        write_prediction_files(prediction, "/results/predictions")
    prediction = predictor.predict_array(volume, affine)  # volume (X, Y, Z) or (C, X, Y, Z), affine (4, 4)

Each case is read once and preprocessed once per configuration exactly as training data was
(`data_preprocessing`), then predicted by every fold's network (sliding windows, flips with TTA). The ensemble
is the mean of every member's probabilities (each fold of each configuration counts once):

* the folds of one configuration share its grid, so their float16 probabilities are summed in place there and
  the sum goes to the source grid once. That step (`nnunet.export.crop_slabs`: unpadding, then linear
  interpolation with order 0 along a separately handled axis, slab by slab) is linear in its input, so
  resampling the sum equals summing the resampled members, up to rounding, for one resampling instead of one
  per fold;
* configurations (2D, 3D, ...) have different grids: their resampled sums are added slab by slab on the
  source grid.

Labels come from the mean (argmax, or region probabilities > 0.5), then the package's postprocessing. On request
a `Prediction` also holds the mean probabilities and two uncertainty maps: the entropy of the mean probabilities
in nats (softmax: -sum p ln p, at most ln K; regions: the sum of each region's binary entropy) and the fraction
of members whose own labels differ from the ensemble's labels before postprocessing. One case is predicted at a
time, the next one read meanwhile (`read_cases`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from data_preprocessing.dicom import check_output_format, raw_cases
from data_preprocessing.layouts import CHANNEL_FILE, CaseFiles, case_id_of
from data_preprocessing.reading import LoadedCase, case_meta, checked_image, load_case, spacing_dhw
from data_preprocessing.transforms import preprocess_arrays
from nnunet import postprocessing
from nnunet.checkpoints import read_checkpoint, state_dict_mismatch, stored_settings
from nnunet.export import (
    ProbabilityFile,
    crop_labels,
    outside_fill,
    place_in_source,
    slab_axis,
    source_header,
    source_image,
)
from nnunet.inference import CaseTooLarge, check_room
from nnunet.nn_unet import PREDICTION_DTYPE, PREDICTIONS, NNUnet
from nnunet.package import ModelPackage, read_package
from nnunet.trainer import resolve_device
from utils.background import ReadAhead, WriteBehind
from utils.errors import UserError
from utils.io import atomic_open, check_writable, load_json, save_nifti
from utils.settings import DeviceSettings, InferenceSettings


@dataclass(frozen=True)
class Member:
    """One network of the ensemble: a fold of a configuration."""

    configuration: str
    fold: int
    model: NNUnet


@dataclass
class Prediction:
    """One case's prediction on its source grid, in the source array's axis order (NIfTI: X, Y, Z).

    Attributes:
        case_id: the case.
        labels: (X, Y, Z) uint8, after postprocessing.
        affine: (4, 4) the source image's affine.
        header: the source image's NIfTI header.
        probabilities: (K, X, Y, Z) float16, the ensemble's mean (softmax classes or sigmoid regions), or None.
        entropy: (X, Y, Z) float32, entropy of `probabilities` in nats, or None.
        disagreement: (X, Y, Z) float32 in [0, 1], the fraction of members whose labels differ from the ensemble's
            (before postprocessing), or None.
        dicom: for a DICOM case, its metadata's "dicom" entry (the source files a DICOM SEG references), or None.
    """

    case_id: str
    labels: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    probabilities: np.ndarray | None = None
    entropy: np.ndarray | None = None
    disagreement: np.ndarray | None = None
    dicom: dict | None = None


class Predictor:
    """The networks of a model package on one device, predicting one case at a time (see the module docstring).

    Build it with `Predictor.from_package`.
    """

    def __init__(self, package: ModelPackage, members: list[Member], device: torch.device, tta: bool = False,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.package = package
        self.members = members
        self.device = device
        self.tta = tta
        self.amp_dtype = amp_dtype
        first = members[0].model
        self.regions = first.regions
        self.activation = first.activation
        self.in_channels = int(first.config["in_channels"])
        self.n_outputs = first.n_outputs

    @classmethod
    def from_package(cls, path: str | os.PathLike, folds: Sequence[int] | None = None,
                     device: str | torch.device = "cpu", tta: bool = False, overlap: float = 0.5,
                     blend: str = "gaussian", batch_size: int = 4, amp: bool = False,
                     amp_dtype: str | None = None, stitch_device: str = "auto") -> Predictor:
        """Read a package, check it and load its networks.

        Args:
            path: the package folder.
            folds: predict with these folds of every configuration only (None: all).
            device: "cpu", "cuda", "cuda:1", ...
            tta: average over every flip of the spatial axes.
            overlap, blend, batch_size: the sliding windows (`nnunet.inference.predict_volume`).
            amp: autocast the networks, in `amp_dtype` ("fp16" or "bf16"; default fp16 on CUDA, else bf16).
            stitch_device: where a case's scores are summed ("auto", "gpu", "cpu"; `nnunet.inference`).

        Raises:
            UserError: one line naming the problem (`nnunet.package.read_package`; a fold checkpoint trained on
                another plan than its configuration's plan.json; members with different outputs; no such device).
        """
        package = read_package(path, list(folds) if folds is not None else None)
        torch_device = resolve_device(device)
        inference = InferenceSettings(overlap=overlap, blend=blend, batch_size=batch_size, tta=tta,
                                      stitch_device=stitch_device)
        members = []
        for name, configuration in package.configurations.items():
            plan = load_json(configuration.plan)
            for fold, checkpoint in sorted(configuration.folds.items()):
                model = load_member(checkpoint, plan, inference, f"fold {fold} of configuration {name}",
                                    configuration.plan)
                members.append(Member(name, fold, model.to(torch_device)))
        check_members_agree(members, package.root)
        dtype = None
        if amp:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[
                amp_dtype or ("fp16" if torch_device.type == "cuda" else "bf16")]
        return cls(package, members, torch_device, tta, dtype)

    def describe(self) -> str:
        """The members, e.g. "3d folds 0 1, 2d fold 0"."""
        parts = []
        for name in dict.fromkeys(member.configuration for member in self.members):
            folds = [str(member.fold) for member in self.members if member.configuration == name]
            parts.append(f"{name} fold{'s' if len(folds) > 1 else ''} {' '.join(folds)}")
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------
    def input_cases(self, inputs: str | os.PathLike | Sequence[str | os.PathLike],
                    dicom_channels: Sequence[str] = ()) -> tuple[Path, list[CaseFiles]]:
        """The cases of a folder, of one image file or of a list of them (MSD `<case>.nii.gz`, 3D or 4D with
        channels last, or nnU-Net v2 `<case>_0000.nii.gz`, one file per channel), or of a folder of DICOM series
        (`data_preprocessing.dicom`, with `dicom_channels` the SeriesDescription of each channel); (folder, cases)
        for `load_case`.
        """
        if isinstance(inputs, str | os.PathLike):
            path = Path(inputs)
            if path.is_dir():
                names = list(self.members[0].model.config.get("modalities", {}).values())
                return path, raw_cases(path, self.in_channels, dicom_channels, names)
            inputs = [path]
        if dicom_channels:
            raise UserError("--dicom_channels needs --input to be a folder of DICOM series")
        return Path("/"), file_cases([Path(p) for p in inputs], self.in_channels)

    def predict(self, inputs: str | os.PathLike | Sequence[str | os.PathLike], probabilities: bool = False,
                uncertainty: bool = False) -> Iterator[Prediction]:
        """Predict image files one case at a time (see `input_cases`); the inputs are listed and checked at the
        call, each case is read and predicted as the iterator reaches it."""
        folder, cases = self.input_cases(inputs)
        return self.predict_cases(folder, cases, probabilities, uncertainty)

    def predict_cases(self, folder: Path, cases: Sequence[CaseFiles], probabilities: bool = False,
                      uncertainty: bool = False, probabilities_to: Path | None = None) -> Iterator[Prediction]:
        """`predict` of listed cases; with `probabilities_to`, probabilities stream into files there."""
        for case, loaded in self.read_cases(folder, cases):
            yield self.predict_loaded(case, loaded, probabilities, uncertainty, probabilities_to)

    def read_cases(self, folder: Path, cases: Sequence[CaseFiles]) -> Iterator[tuple[CaseFiles, LoadedCase]]:
        """Each case and its images, the next case read in a background thread while the caller predicts."""
        return iter(ReadAhead(lambda index: (cases[index], load_case(folder, cases[index], self.in_channels, ())),
                              len(cases)))

    def predict_array(self, image: np.ndarray, affine: np.ndarray | None = None,
                      spacing: Sequence[float] | None = None, case_id: str = "image", probabilities: bool = False,
                      uncertainty: bool = False) -> Prediction:
        """Predict an image in memory, preprocessed as the NIfTI file it would be.

        Args:
            image: (X, Y, Z) or (C, X, Y, Z) voxels, in NIfTI's axis order.
            affine: (4, 4) voxel to world (mm); default: `spacing` on the diagonal.
            spacing: (sx, sy, sz) mm, when no affine is given (default 1 mm).
            case_id: the name used in messages and in `Prediction.case_id`.

        Returns:
            The prediction, its arrays (X, Y, Z) or (K, X, Y, Z).
        """
        data = np.asarray(image, dtype=np.float32)
        if affine is not None and spacing is not None:
            raise ValueError("give the affine or the spacing, not both")
        if affine is None:
            affine = np.diag([*(spacing if spacing is not None else (1.0, 1.0, 1.0)), 1.0])
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise UserError(f"{case_id}: the affine must be a 4x4 matrix, got shape {affine.shape}")
        if data.ndim == 4:  # NIfTI stores channels last
            data = np.moveaxis(data, 0, -1)
        nifti = nib.Nifti1Image(data, affine)
        nifti.set_qform(affine, code=1)
        nifti.set_sform(affine, code=1)
        case = CaseFiles(case_id, f"array {case_id}", None)
        loaded = LoadedCase(checked_image(data, case, self.in_channels), None, spacing_dhw(nifti), nifti)
        return self.predict_loaded(case, loaded, probabilities, uncertainty)

    # ------------------------------------------------------------------------------------------
    # The ensemble
    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_loaded(self, case: CaseFiles, loaded: LoadedCase, probabilities: bool = False,
                       uncertainty: bool = False, probabilities_to: Path | None = None) -> Prediction:
        """Predict one loaded case with every member (see the module docstring); with `probabilities_to`, the
        probabilities stream into `<case>_probs.npz` there instead of into the prediction."""
        grids: list[tuple[torch.Tensor, dict]] = []  # per configuration: its members' summed probabilities, meta
        member_labels: list[np.ndarray] = []  # (d, h, w) uint8 each, for the disagreement
        configurations = list(dict.fromkeys(member.configuration for member in self.members))
        for position, name in enumerate(configurations):
            members = [member for member in self.members if member.configuration == name]
            # Preprocessing may normalise the image in place (a crop of the whole image is no copy): every
            # configuration but the last gets its own copy.
            source = loaded if position == len(configurations) - 1 else replace(loaded, image=loaded.image.copy())
            image, _, geometry = preprocess_arrays(source, members[0].model.config, training=False)
            del source
            meta = case_meta(case, loaded, geometry)
            if grids and (meta["crop_box"], meta["cropped_shape"]) != (grids[0][1]["crop_box"],
                                                                       grids[0][1]["cropped_shape"]):
                raise RuntimeError(f"{case.case_id}: configurations cropped the image differently")
            volume = torch.from_numpy(image)[None].to(self.device)
            del image
            model = members[0].model
            check_room(case.case_id, volume, self.n_outputs, model.patch_size, model.inference.batch_size, self.tta,
                       model.inference.stitch_device, PREDICTION_DTYPE)
            network_sum: torch.Tensor | None = None  # (K, D, H, W) half precision on the configuration's grid
            for member in members:
                output = self.infer(member.model, volume)
                if uncertainty:
                    member_labels.append(crop_labels([(output, meta)], self.regions))
                network_sum = output if network_sum is None else network_sum.add_(output)
                del output
            del volume
            grids.append((network_sum, meta))
        reference = grids[0][1]
        channels = grids[0][0].shape[0]
        shape = [int(n) for n in reference["cropped_shape"]]
        axis = slab_axis(reference)
        consumers = []

        def into(array: np.ndarray, convert) -> None:
            def consume(start: int, stop: int, scores: torch.Tensor) -> None:
                index = [slice(None)] * array.ndim
                index[array.ndim - 3 + axis] = slice(start, stop)
                array[tuple(index)] = convert(scores)
            consumers.append(consume)

        mean = entropy_map = None
        if probabilities and probabilities_to is None:
            mean = np.empty((channels, *shape), dtype=np.float16)
            into(mean, lambda scores: scores.numpy())
        if uncertainty:
            entropy_map = np.empty(shape, dtype=np.float32)
            into(entropy_map, lambda scores: entropy(scores, bool(self.regions)).numpy())
        fill = outside_fill(channels, self.regions)
        with (ProbabilityFile(Path(probabilities_to) / f"{case.case_id}_probs.npz", reference, fill)
              if probabilities and probabilities_to is not None else nullcontext()) as stream:
            if stream is not None:
                consumers.append(stream)
            ensemble = crop_labels(grids, self.regions, 1 / len(self.members), consumers)
        del grids
        processing = self.package.postprocessing
        labels = postprocessing.apply(ensemble, processing.foreground_largest_component,
                                      processing.largest_component_labels)
        prediction = Prediction(case.case_id, place_in_source(labels, reference), np.array(reference["affine"]),
                                source_header(reference), dicom=reference.get("dicom"))
        if mean is not None:
            prediction.probabilities = place_in_source(mean, reference, fill=fill)
        if uncertainty:
            prediction.entropy = place_in_source(entropy_map, reference)
            prediction.disagreement = place_in_source(disagreement(member_labels, ensemble), reference)
        return prediction

    def infer(self, model: NNUnet, volume: torch.Tensor) -> torch.Tensor:
        """(1, C, D, H, W) on the device -> (K, D, H, W) float16 probabilities of one network (`NNUnet.infer`)."""
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            return model.infer(volume, tta=self.tta, activation=self.activation, dtype=PREDICTION_DTYPE)[0]


def device_name(device: DeviceSettings) -> str:
    """The torch device of the command line's device settings: cuda for --gpus, else the accelerator's name."""
    return "cuda" if device.kind == "gpu" else device.kind


def load_member(path: Path, plan: dict, inference: InferenceSettings, what: str, plan_path: Path) -> NNUnet:
    """The network of a fold checkpoint, in evaluation mode, checked against its configuration's plan.json."""
    checkpoint = read_checkpoint(path)
    config, model_settings, optim = stored_settings(checkpoint, path)
    stored = json.loads(json.dumps(config))  # as plan.json holds it: lists, string keys
    if stored != plan:
        keys = sorted(key for key in stored.keys() | plan.keys() if stored.get(key) != plan.get(key))
        raise UserError(f"{path}: {what} was trained with another plan than {plan_path} (they differ in "
                        f"{', '.join(keys)}); package checkpoints trained with that plan")
    model = NNUnet(config, model_settings, optim, inference)
    mismatch = state_dict_mismatch(model, checkpoint["state_dict"])
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit the network it describes ({mismatch})")
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def check_members_agree(members: list[Member], root: Path) -> None:
    """Every member must read the same channels and predict the same outputs (classes or regions)."""
    first = members[0]

    def outputs(member: Member) -> tuple:
        model = member.model
        return int(model.config["in_channels"]), model.n_outputs, model.activation, model.regions

    for member in members[1:]:
        if outputs(member) != outputs(first):
            raise UserError(f"{root}: fold {member.fold} of configuration {member.configuration} reads "
                            f"{outputs(member)[0]} channel(s) into {outputs(member)[1]} {member.model.activation} "
                            f"outputs, fold {first.fold} of {first.configuration} {outputs(first)[0]} into "
                            f"{outputs(first)[1]} {first.model.activation} outputs; package members of one task")


def file_cases(paths: list[Path], n_channels: int) -> list[CaseFiles]:
    """Image files as cases: one file per case, or with several channels and every name `<case>_0000.nii.gz`,
    one file per channel (absolute paths)."""
    for path in paths:
        if not path.is_file():
            raise UserError(f"--input {path} is not an image file or a folder of images")
    matches = [CHANNEL_FILE.match(path.name) for path in paths]
    if not (n_channels > 1 and all(matches)):
        return [CaseFiles(case_id_of(path.name), str(path.resolve()), None) for path in paths]
    grouped: dict[tuple[Path, str], dict[int, str]] = {}
    for path, match in zip(paths, matches):
        grouped.setdefault((path.resolve().parent, match["case"]), {})[int(match["channel"])] = str(path.resolve())
    cases = []
    for (folder, case_id), channels in grouped.items():
        if sorted(channels) != list(range(n_channels)):
            raise UserError(f"{case_id}: expected channel files _0000 to _{n_channels - 1:04d} in {folder}, "
                            f"given {sorted(channels)}")
        cases.append(CaseFiles(case_id, tuple(channels[c] for c in range(n_channels)), None))
    return cases


def entropy(probabilities: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """(K, ...) probabilities -> (...) float32 entropy in nats: -sum_k p_k ln p_k for softmax classes, the sum of
    the binary entropies -p ln p - (1 - p) ln(1 - p) for independent (sigmoid) regions; one class at a time."""
    result = torch.zeros(probabilities.shape[1:], dtype=torch.float32)
    for channel in probabilities.float():
        result -= torch.special.xlogy(channel, channel)
        if regions:
            result -= torch.special.xlogy(1 - channel, 1 - channel)
    return result.clamp_(min=0)


def disagreement(member_labels: list[np.ndarray], ensemble: np.ndarray) -> np.ndarray:
    """The fraction of members whose label map differs from the ensemble's at each voxel, float32 in [0, 1]."""
    differing = np.zeros(ensemble.shape, dtype=np.float32)
    for labels in member_labels:
        differing += labels != ensemble
    return differing / max(len(member_labels), 1)


def write_prediction_files(prediction: Prediction, folder: str | os.PathLike, class_names: Sequence[str] = (),
                           output_format: str = "nifti") -> Path:
    """Write `<case>.nii.gz` (uint8 labels with the source's affine and header) and what the prediction holds:
    `<case>_probs.npz` (float16, as `nnunet.export.write_prediction`), `<case>_entropy.nii.gz` and
    `<case>_disagreement.nii.gz` (float32). With `output_format` "dicom-seg" the labels are a DICOM SEG
    `<case>.dcm` instead (`nnunet.dicom_seg`, named `class_names`), with "both" as well. Returns the labels' path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prediction.case_id}.nii.gz"
    if output_format != "dicom-seg":
        save_nifti(path, source_image(prediction.labels, prediction.affine, prediction.header))
    if output_format != "nifti":
        from nnunet.dicom_seg import write_dicom_seg  # highdicom only for DICOM SEG output

        seg_path = write_dicom_seg(folder, prediction.case_id, prediction.labels, {"dicom": prediction.dicom},
                                   class_names)
        path = seg_path if output_format == "dicom-seg" else path
    if prediction.probabilities is not None:
        with atomic_open(folder / f"{prediction.case_id}_probs.npz", "wb") as handle:
            np.savez_compressed(handle, probabilities=prediction.probabilities)
    for name, volume in (("entropy", prediction.entropy), ("disagreement", prediction.disagreement)):
        if volume is not None:
            save_nifti(folder / f"{prediction.case_id}_{name}.nii.gz",
                       source_image(volume.astype(np.float32), prediction.affine, prediction.header))
    return path


def predict_package(package: str, inputs: str, folds: Sequence[int] | None, inference: InferenceSettings,
                    device: DeviceSettings, save_uncertainty: bool = False) -> list[str]:
    """`main.py --exec_mode predict --model PKG --input RAW`: write each case's labels (and, as asked,
    probabilities and uncertainty maps) to `inference.results/predictions`; returns the case ids.

    The package, its checkpoints and the input files are checked before anything is written.
    """
    if device.gpus > 1 or device.nodes > 1 or device.cpu_processes > 1:
        raise UserError("--model predicts in one process: use one device (--gpus 1 or 0, --cpu_processes 1)")
    predictor = Predictor.from_package(package, folds, device_name(device), tta=inference.tta,
                                       overlap=inference.overlap, blend=inference.blend,
                                       batch_size=inference.batch_size, amp=device.amp, amp_dtype=device.amp_dtype,
                                       stitch_device=inference.stitch_device)
    folder, cases = predictor.input_cases(inputs, inference.dicom_channels)
    check_output_format(inference.output_format, cases)
    output = Path(inference.results) / PREDICTIONS
    check_writable(output)
    names = predictor.members[0].model.label_names
    failed = []
    writer = WriteBehind()  # the previous case is written while the next one is predicted
    try:
        for case, loaded in tqdm(predictor.read_cases(folder, cases), total=len(cases), desc="cases", unit="case",
                                 disable=len(cases) < 2 or not sys.stderr.isatty()):
            try:
                prediction = predictor.predict_loaded(case, loaded, inference.save_probs, save_uncertainty,
                                                      probabilities_to=output)
            except CaseTooLarge as error:
                print(error, file=sys.stderr, flush=True)
                failed.append(case.case_id)
                continue
            del loaded
            writer.submit(write_prediction_files, prediction, output, names, inference.output_format)
            del prediction
    finally:
        writer.close()
    print(f"predicted {len(cases) - len(failed)} case(s) with the mean of {len(predictor.members)} network(s) "
          f"({predictor.describe()}) into {output}")
    if failed:
        raise UserError(f"{len(failed)} of {len(cases)} case(s) not predicted (see above): {', '.join(failed)}")
    return [case.case_id for case in cases]
