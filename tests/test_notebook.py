"""notebooks/01_dsr_quickstart.ipynb runs top to bottom (tiny settings: DSR_NOTEBOOK_FAST=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_dsr_quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DSR_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("DSR_NOTEBOOK_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("DSR_NOTEBOOK_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "image AUROC" in outputs and "exported" in outputs and "mask pixels differing" in outputs
    assert (tmp_path / "output" / "export" / "weights" / "openvino" / "model.xml").is_file()
