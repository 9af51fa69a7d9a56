"""examples/analysis.ipynb runs top to bottom on a fake run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "analysis.ipynb"


def test_example_notebook_executes(shared_run, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SINKSCOPE_RUN_DIR", str(shared_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "WARNING: random-weight LPIPS backbone: numbers are not LPIPS" in text
    assert "sink_k5" in text and "mean Δ" in text  # the main table
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert (shared_run / "report" / "figures" / "forest_notebook.png").is_file()
