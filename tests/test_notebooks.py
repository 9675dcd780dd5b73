"""Every notebook in notebooks/ runs end to end (executed with the library's own code)."""

from __future__ import annotations

from pathlib import Path

import pytest

import required

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_there_are_six_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"], NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, gpu_or_numpy, tmp_path, monkeypatch):
    """On NumPy, and on CuPy where a GPU is (``-m slow -k "notebook and cupy"``): the
    notebooks read their backend from ``SWAV_REF_BACKEND``, which the kernel inherits."""
    monkeypatch.setenv("SWAV_REF_BACKEND", gpu_or_numpy.__name__)
    jupytext = required.module("jupytext")
    nbclient = required.module("nbclient")
    nb = jupytext.read(path)
    assert any(c.cell_type == "markdown" for c in nb.cells), "a notebook needs prose"
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import swav_ref" in source or "from swav_ref" in source, "notebooks import the library"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Run in a scratch folder so outputs (figures, checkpoints) never land in the repo.
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    if path.name.startswith("06"):  # the notebook that says which backend it runs on
        assert f"backend: {gpu_or_numpy.__name__}" in printed, printed[:2000]
