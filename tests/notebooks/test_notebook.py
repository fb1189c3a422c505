"""notebooks/custom_dataset.ipynb: committed without outputs, and runs headless to a Dice."""

import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "custom_dataset.ipynb"
# Not copied into the working copy: version control, environments, caches and earlier outputs.
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache",
                                 ".ipynb_checkpoints", "demo", "data", "results", ".whl")
KERNEL = "nnunet-notebook-test"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.fixture
def kernel_for_this_python(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts this interpreter, found first through JUPYTER_PATH, whatever else is installed."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nnU-Net notebook test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL


def test_notebook_runs_to_a_dice(tmp_path, kernel_for_this_python):
    copy = tmp_path / "repository"
    shutil.copytree(ROOT, copy, ignore=IGNORED)
    notebook = nbformat.read(copy / "notebooks" / "custom_dataset.ipynb", as_version=4)
    # Started in notebooks/, as Jupyter starts a kernel in the notebook's folder.
    client = NotebookClient(notebook, kernel_name=kernel_for_this_python, timeout=600,
                            resources={"metadata": {"path": str(copy / "notebooks")}})
    client.execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [output for cell in code for output in cell.outputs if output.output_type == "error"]
    text = "\n".join(output.get("text", "") for cell in code for output in cell.outputs
                     if output.output_type == "stream")
    match = re.search(r"Dice on the 6 test images: (\d\.\d+)", text)
    assert match, text[-2000:]
    assert float(match[1]) > 0.5  # a trained network; an untrained one scores near 0 on the discs
    assert (copy / "demo" / "custom" / "results" / "predictions" / "unseen_000_overlay.png").stat().st_size > 1000
    # The last cell showed the overlay and the predicted mask as images.
    assert sum("image/png" in output.get("data", {}) for output in code[-1].outputs) == 2
