"""The walkthrough notebook runs top to bottom, and is committed with its outputs."""

from __future__ import annotations

import os

import pytest
from conftest import REPO, SHAKESPEARE

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "notebooks" / "gpt_from_scratch.ipynb"


def test_notebook_is_committed_with_its_outputs_and_no_corpus_text():
    """It reads on a repository page without running: plots, samples and shapes are in the file
    (notebooks/execute.py writes them), but never the corpus's own text, and the file stays small."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [out for cell in code_cells for out in cell.outputs]
    assert [i for i, cell in enumerate(code_cells) if cell.execution_count is None and cell.outputs] == []
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 3, "run python notebooks/execute.py"
    assert not [out for out in outputs if out.output_type == "error"]
    shown = "".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")) for out in outputs)
    assert "First Citizen" not in shown  # the opening of Tiny Shakespeare, which the corpus cell would print
    assert NOTEBOOK.stat().st_size < 1_500_000


def _execute(tmp_path, monkeypatch, quick: bool):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE} (set SCRATCHGPT_TEST_DATA)")
    monkeypatch.setenv("SCRATCHGPT_DATA", str(SHAKESPEARE))
    monkeypatch.setenv("SCRATCHGPT_NOTEBOOK_QUICK", "1" if quick else "0")
    # The kernel is another process: make it import this checkout's package, as pytest does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"a notebook cell failed: {str(exc)[-2000:]}")
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 3  # the loss curve, the attention maps, the sampling distributions
    return notebook


def test_notebook_runs_top_to_bottom_quickly(tmp_path, monkeypatch):
    """Every cell, with the training cut to a few steps (SCRATCHGPT_NOTEBOOK_QUICK=1)."""
    notebook = _execute(tmp_path, monkeypatch, quick=True)
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "same as CausalSelfAttention: True" in text and "same as Block: True" in text
    assert "all checked" in text  # the attention maps explain the module's output


@pytest.mark.slow
def test_notebook_runs_in_full(tmp_path, monkeypatch):
    """The notebook as a reader runs it, with its 45-second training run."""
    _execute(tmp_path, monkeypatch, quick=False)
