"""Checks tutorial.ipynb: the committed copy, a fresh run on the smoke preset, and what it needs around it.

    python -m pytest -q test_tutorial.py

Every identity the notebook claims is an `assert` inside it, so a run without errors checks them all.
  * the committed notebook: executed top to bottom on the cpu preset, no errors, figures present, no absolute
    paths of this machine in its outputs (that it imports nothing from study/ is test_layout.py's check);
  * a fresh run on the smoke preset (what CI runs), with the exercises' worked answers appended as cells, so
    every answer passes its own check_... function;
  * the first code cell, run in an empty folder (the notebook opened without the repository), stops with a
    message that says what to fetch and install, instead of an ImportError further down;
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent
NOTEBOOK = ROOT / "tutorial.ipynb"


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def exercise_answers(nb):
    """The ```python blocks inside the notebook's <details> (worked answer) sections."""
    answers = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "<details>" in cell.source:
            answers += re.findall(r"```python\n(.*?)```", cell.source, flags=re.DOTALL)
    return answers


def test_committed_notebook_is_executed_cleanly():
    nb = json.loads(NOTEBOOK.read_text())
    code = code_cells(nb)
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


def test_notebook_runs_on_smoke_preset_and_exercise_answers_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("GRALORA_PRESET", "smoke")
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    answers = exercise_answers(nb)
    assert len(answers) >= 1, "the exercises' worked answers (```python inside <details>) are missing"
    nb.cells += [nbformat.v4.new_code_cell(source) for source in answers]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("preset: smoke" in o.get("text", "") for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs)
    for n in range(1, 6):
        assert f"Exercise {n}: right" in printed, f"exercise {n}'s worked answer does not pass its check"


def test_first_cell_says_what_to_install_when_the_notebook_is_alone(tmp_path):
    """Opened without the repository next to it, the first code cell stops with instructions."""
    first = "".join(code_cells(json.loads(NOTEBOOK.read_text()))[0]["source"])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", first], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0, "the first cell ran without the repository: it should have stopped"
    message = result.stderr
    assert "ModuleNotFoundError" not in message.splitlines()[-1], "a bare ImportError instead of instructions"
    for needed in ["No module named 'gralora'", "clone", "pip install torch numpy matplotlib",
                   "repository's root folder"]:
        assert needed in message, f"the message does not say {needed!r}:\n{message}"
