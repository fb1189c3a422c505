"""Raw images for prediction: each NIfTI case of a folder read and preprocessed as the task's plan says.

`main.py --exec_mode predict --input DIR` predicts images that were never preprocessed: this dataset
reads each case (MSD `<case>.nii.gz` with channels last, nnU-Net v2 `<case>_0000.nii.gz` per channel, or DICOM
series, `data_preprocessing.dicom`),
crops, resamples and normalises it with `data_preprocessing.preprocessor` exactly as training data was, and
hands Lightning's predict loop the same batch as the preprocessed test folder does, with the case's
metadata for writing the prediction back onto the source image. The next case is read and preprocessed in a
background thread while the current one is predicted (`utils.background.ReadAhead`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from data_preprocessing.dicom import raw_cases
from data_preprocessing.reading import case_meta, load_case
from data_preprocessing.transforms import preprocess_arrays
from utils.background import Handover, ReadAhead
from utils.errors import UserError


class RawImages(Dataset):
    """The raw cases of a folder, preprocessed on the fly.

    Args:
        folder: the images.
        config: the task plan of the model that predicts them.

    Items: {"image": (C, D, H, W) float32 tensor, "case_id": str, "meta": dict (docs/data_format.md)}.
    """

    def __init__(self, folder: str | Path, config: dict, dicom_channels: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"--input {self.folder} is not a folder of NIfTI images or DICOM series")
        self.config = config
        self.cases = raw_cases(self.folder, config["in_channels"], dicom_channels,
                               list(config.get("modalities", {}).values()))
        self.label_values = [int(value) for value in config["labels"]]
        self.reader = ReadAhead(self.load, len(self.cases))  # case i + 1 loads while case i is predicted

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.reader[index]

    def load(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        loaded = load_case(self.folder, case, self.config["in_channels"], self.label_values)
        image, _, geometry = preprocess_arrays(loaded, self.config, training=False)
        return {"image": torch.from_numpy(image), "case_id": case.case_id, "meta": case_meta(case, loaded, geometry)}


def one_case_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of one case, as the volume loaders give it: image (1, C, D, H, W), case_id [str], meta; the image
    in a `Handover`, so that prediction frees it once predicted (Lightning keeps the batch until the next one)."""
    (item,) = items
    return {"image": Handover(item["image"][None]), "case_id": [item["case_id"]], "meta": item["meta"]}


def raw_image_loader(folder: str | Path, config: dict, dicom_channels: Sequence[str] = ()) -> DataLoader:
    """One case per batch, in this process; each case is read and preprocessed while the one before is predicted."""
    return DataLoader(RawImages(folder, config, dicom_channels), batch_size=1, collate_fn=one_case_batch)
