"""The tutorial notebook in examples/ runs from top to bottom against the current code."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "tutorial.ipynb"


def test_tutorial_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is part of the test extra")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # committed with its outputs (scripts/execute_tutorial.py), so a reader on GitHub sees the figures
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "run scripts/execute_tutorial.py and commit the outputs"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "the notebook shows no figure"
    for cell in code:
        cell.outputs = []
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    for expected in ("same person:", "deletion AUC", "sanity:", "eye_bar", "its response to noise", "ONNX file"):
        assert expected in text, f"the notebook no longer prints {expected!r}"
