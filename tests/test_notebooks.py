from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO


@pytest.mark.slow
def test_eda_notebook_runs_on_a_competition(small_digits: Path, monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA", str(small_digits))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(REPO / "notebooks" / "eda.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "320 train rows, 80 test rows, 10 classes" in text
    assert "0 exact, 0 near, 0 small, 0 sparse duplicate pairs; 0 unreadable images, 0 flat, 400 too small" in text
    assert "TqdmWarning" not in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
