"""Executes tutorial.ipynb headless on the smoke preset, so the notebook can never silently rot.

    python -m pytest -q test_tutorial.py

Every identity the notebook claims is an `assert` inside it, so a run without errors checks them all.
The committed notebook itself is checked too: executed top to bottom, no errors, figures present,
no absolute paths of this machine in its outputs.
"""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent
NOTEBOOK = ROOT / "tutorial.ipynb"


def test_committed_notebook_is_executed_cleanly():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, "the notebook has no code cells"
    counts = [c["execution_count"] for c in code]
    assert None not in counts and counts == sorted(counts), "commit the notebook executed top to bottom"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5, "the figures are missing"
    text = json.dumps(outputs)
    for path in {str(ROOT), os.path.expanduser("~")}:
        assert path not in text, f"an absolute path ({path}) leaked into the outputs"
    assert "preset: cpu" in text, "commit the notebook executed on the cpu preset"


def test_notebook_runs_on_smoke_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("GRALORA_PRESET", "smoke")
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("preset: smoke" in o.get("text", "") for o in outputs)
