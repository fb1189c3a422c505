"""evaluate.py --report: one self-contained HTML page, read back with html.parser (and chromium when present)."""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import evaluate
from utils.logger import DLLogger


class Page(HTMLParser):
    """Rows of the table body and every URL the page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.rows, self.urls, self.in_body, self.images = 0, [], False, 0

    def handle_starttag(self, tag, attrs):
        self.in_body |= tag == "tbody"
        self.rows += tag == "tr" and self.in_body
        self.images += tag == "img"
        self.urls += [value for name, value in attrs if name in ("src", "href", "action", "srcset", "data")]

    def handle_endtag(self, tag):
        self.in_body &= tag != "tbody"


def make_evaluation(root: Path, cases: int = 4) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    folders = [root / name for name in ("preds", "labels", "images")]
    for folder in folders:
        folder.mkdir()
    affine = np.diag([1.5, 1.0, 1.0, 1.0])
    for index in range(cases):
        label = np.zeros((12, 14, 10), np.uint8)
        label[3:9, 3:10, 2:8] = 1
        label[5:8, 5:8, 4:7] = 2
        prediction = np.roll(label, index, axis=0)  # worse and worse cases
        image = rng.normal(size=(12, 14, 10, 2)).astype(np.float32) + label[..., None]
        for folder, data in zip(folders, (prediction, label, image)):
            nib.save(nib.Nifti1Image(data, affine), str(folder / f"case_{index}.nii.gz"))
    return tuple(folders)


def test_report_is_one_offline_page_with_every_case(tmp_path):
    preds, labels, images = make_evaluation(tmp_path)
    training = tmp_path / "training"
    log = DLLogger(training / "logs.json")
    for epoch in range(3):
        log.log(epoch, {"train_loss": 1.0 - 0.2 * epoch, "val_loss": 0.9 - 0.2 * epoch, "dice_mean": 0.3 * epoch})
    assert evaluate.main(["--preds", str(preds), "--lbls", str(labels), "--hd95", "--report",
                          "--images", str(images), "--results", str(training)]) == 0
    page_path = preds / "evaluation.html"
    text = page_path.read_text()
    page = Page()
    page.feed(text)
    assert page.rows == 4
    assert all(url.startswith("data:image/png;base64,") for url in page.urls) and page.urls
    assert page.images == 2 + 3 + 1  # Dice and HD95 distributions, best/median/worst, learning curves
    assert "http" not in text.lower().replace("http-equiv", "")
    assert "<script src" not in text and "<link" not in text



def test_report_renders_in_a_headless_browser(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium to take a screenshot with")
    preds, labels, _ = make_evaluation(tmp_path, cases=1)
    assert evaluate.main(["--preds", str(preds), "--lbls", str(labels), "--report"]) == 0
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    f"--screenshot={shot}", "--window-size=1000,800", (preds / "evaluation.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 1000


def test_report_without_images_and_flags_that_need_it(tmp_path, capsys):
    preds, labels, _ = make_evaluation(tmp_path, cases=2)
    assert evaluate.main(["--preds", str(preds), "--lbls", str(labels), "--report"]) == 0
    page = Page()
    page.feed((preds / "evaluation.html").read_text())
    assert page.rows == 2 and page.images == 1 + 2
    with pytest.raises(SystemExit):
        evaluate.main(["--preds", str(preds), "--lbls", str(labels), "--images", str(preds)])
    assert "add --report" in capsys.readouterr().err
    assert evaluate.main(["--preds", str(preds), "--lbls", str(labels), "--report", "--results",
                          str(tmp_path)]) == 1
    assert "no logs.json" in capsys.readouterr().err
