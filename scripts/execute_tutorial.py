"""Execute ``examples/tutorial.ipynb`` and save it with its outputs, so its figures show on GitHub.

    .venv/bin/python scripts/execute_tutorial.py

The notebook runs in a temporary folder (its files go there, not into the repo), on the embedded
public-domain portraits only. Timing metadata is dropped, so re-running it changes the file only
where the outputs changed. The test suite re-executes the notebook (``tests/test_examples.py``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tutorial.ipynb"


def main() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facelens-tutorial-") as tmp:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, NOTEBOOK)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    print(f"{NOTEBOOK}: executed in {time.perf_counter() - start:.0f} s, {images} figures, "
          f"{NOTEBOOK.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
