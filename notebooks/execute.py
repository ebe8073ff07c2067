"""Run the walkthrough notebook top to bottom and save it with its outputs, as committed.

    python notebooks/execute.py          # about two minutes on a 2-core CPU

The outputs (plots, samples, shapes) let the notebook read on a repository page without
running it. The one cell that prints the corpus itself keeps no output: the repository holds
no copy of Tiny Shakespeare's text outside the package's compressed file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().with_name("gpt_from_scratch.ipynb")
CORPUS_CELL_MARK = "text[:250]"  # the cell that prints the start of the corpus


def execute(path: Path = NOTEBOOK, quick: bool = False) -> nbformat.NotebookNode:
    """The notebook at `path`, executed in a fresh kernel (QUICK cuts its training to a few steps)."""
    notebook = nbformat.read(path, as_version=4)
    os.environ["SCRATCHGPT_NOTEBOOK_QUICK"] = "1" if quick else "0"
    src = str(path.resolve().parents[1] / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}})
        client.execute()
    for cell in notebook.cells:
        if cell.cell_type == "code" and CORPUS_CELL_MARK in cell.source:
            cell.outputs = []
    return notebook


if __name__ == "__main__":
    nbformat.write(execute(quick="--quick" in sys.argv), NOTEBOOK)
    print(f"wrote {NOTEBOOK} with its outputs")
