"""Checks tutorial.ipynb as a 45-minute class, and the student copy that student_notebook.py writes from it.

    python -m pytest -q test_tutorial.py

Every identity the notebook claims is an `assert` inside it, so a run without errors checks them all.
  * the budget: the main path (every cell before the markdown cell that starts with "# Appendix") holds at most
    1,300 words of prose (markdown, fenced code blocks left out) and 220 lines of code (code cells' lines that
    are neither blank nor comments), and the minutes in its section headings ("## 3. Title (6 min)") add up to 45;
  * at least six in-class activities: main-path markdown cells that open with "**Your turn N (predict|knob|code)**";
  * every exercise: one `### BEGIN SOLUTION` / `### END SOLUTION` pair in a cell that ends with `check(...)`;
  * the committed notebook: executed top to bottom on the cpu preset, no errors, figures present, every exercise
    answered "right", no absolute paths of this machine in its outputs (that it imports nothing from study/ is
    test_layout.py's check);
  * the student copy, written by student_notebook.py and executed on the smoke preset (what CI runs): it runs to
    its end and each exercise prints one "not yet: ..." line; in the same kernel, appended cells then run the
    teacher's solutions (each "right") and wrong answers (each gets the hint that fits it; an answer that raises,
    its error in one line), so that one execution covers all three;
  * the first code cell, run in an empty folder (the notebook opened without the repository), stops with a
    message that says what to fetch and install, instead of an ImportError further down.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import student_notebook

ROOT = Path(__file__).resolve().parent
NOTEBOOK = ROOT / "tutorial.ipynb"
ACTIVITY = re.compile(r"^\*\*Your turn (\d+) \((predict|knob|code)\)\.\*\*", flags=re.MULTILINE)

# Wrong answers, run after the teacher's solutions (whose functions they reuse), and a hint each must get.
WRONG_ANSWERS = [
    ("judge_loop", "lambda x, base, A, B, s: gralora_by_loop(x, base, A, B, s) - base(x)", "add base(x)"),
    ("judge_loop", "lambda x, base, A, B, s: gralora_by_loop(x, base, A, B, 1.0)", "by scaling"),
    ("judge_loop", "lambda x, base, A, B, s: gralora_by_loop(x, base, A.transpose(0, 1), B, s)", "reads input slice j"),
    ("judge_loop", "lambda x, base, A, B, s: gralora_by_loop(x, base, A, B, s)[..., :4]", "torch.cat"),
    ("judge_parity", "lambda: {**parity_guess(), 'gralora latent': 32}", "its own A_ij x_j"),
    ("judge_parity", "lambda: {**parity_guess(), 'gralora params': 32 * 1024 // 4}", "k*k blocks"),
    ("judge_rank", "lambda: {'whole': 8, 'block': 2}", "independent blocks"),
    ("judge_rank", "lambda: {'whole': 32, 'block': 8}", "a LoRA of rank r/k"),
    ("judge_columns", "lambda: {**columns_guess(), 'lora': 1}", "mixes the columns"),
    ("judge_columns", "lambda: {**columns_guess(), 'gralora': 1}", "its own input slice"),
    ("judge_k1", "lambda: (gralora.GraLoRALinear(nn.Linear(64, 64, dtype=torch.float64), 8, k=1, alpha=8), k1_pair()[1])",
     "scalings differ"),
    ("judge_k1", "lambda: (gralora.GraLoRALinear(k1_pair()[1].base, 8, k=1), k1_pair()[1])", "copy lora.A"),
    ("judge_saving", "lambda: {'exact': 480, 'matmul': 480}", "for every k"),
    ("judge_latent_gib", "lambda: latent_gib() * 2**30 / 1e9", "in GB"),
    ("judge_latent_gib", "lambda: latent_gib() * 8 / 7", "(k - 1) r extra"),
    ("judge_reach", "lambda: {2: 32, 4: 16, 8: 8}", "one of them its own"),
    ("judge_mixed", "lambda: 'lora'", "LoRA at r = 16 cannot"),
    ("judge_mixed", "lambda: 'gralora'", "GraLoRA's blocks cannot"),
    ("judge_parity", "lambda: [32 * 1024] * 4", "AttributeError"),  # not a dict: the error in one line
    ("judge_loop", "lambda x, base, A, B, s: base(x) + x @ A[0, 0]", "RuntimeError: mat1 and mat2"),
]


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def main_path(nb):
    """The cells before the appendix's heading."""
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith("# Appendix"):
            return cells
        cells.append(cell)
    raise AssertionError("no markdown cell starts with '# Appendix'")


def exercise_cells(nb):
    return [c for c in code_cells(nb) if student_notebook.BEGIN in "".join(c["source"])]


def test_main_path_fits_45_minutes():
    cells = main_path(json.loads(NOTEBOOK.read_text()))
    prose = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    words = len(re.sub(r"```.*?```", "", prose, flags=re.DOTALL).split())
    lines = sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))
    minutes = [int(m) for m in re.findall(r"^## \d+\. .*\((\d+) min\)$", prose, flags=re.MULTILINE)]
    assert words <= 1300, f"the main path has {words} words of prose; the budget is 1,300"
    assert lines <= 220, f"the main path has {lines} lines of code; the budget is 220"
    assert len(minutes) >= 6 and sum(minutes) == 45, f"the section headings' minutes {minutes} add up to {sum(minutes)}"


def test_learners_act_six_times_in_class():
    cells = main_path(json.loads(NOTEBOOK.read_text()))
    prose = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    turns = ACTIVITY.findall(prose)
    numbers, kinds = [int(number) for number, _ in turns], {kind for _, kind in turns}
    assert len(numbers) >= 6 and numbers == list(range(1, len(numbers) + 1)), f"activities numbered {numbers}"
    assert kinds == {"predict", "knob", "code"}, f"kinds of activity: {kinds}"


def test_every_exercise_has_one_solution_and_a_check():
    exercises = exercise_cells(json.loads(NOTEBOOK.read_text()))
    assert len(exercises) >= 4
    for cell in exercises:
        source = "".join(cell["source"])
        assert source.count(student_notebook.BEGIN) == 1 == source.count(student_notebook.END), source
        assert re.search(r"^check\(\"[^\"]+\", judge_\w+, \w+\)$", source.rstrip().splitlines()[-1]), source


def test_committed_notebook_is_executed_cleanly():
    nb = json.loads(NOTEBOOK.read_text())
    code = code_cells(nb)
    assert code, "the notebook has no code cells"
    counts = [c["execution_count"] for c in code]
    assert None not in counts and counts == sorted(counts), "commit the notebook executed top to bottom"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 8, "the figures are missing"
    text = json.dumps(outputs)
    for path in {str(ROOT), os.path.expanduser("~")}:
        assert path not in text, f"an absolute path ({path}) leaked into the outputs"
    assert "preset: cpu" in text, "commit the notebook executed on the cpu preset"
    printed = "".join("".join(o.get("text", "")) for c in exercise_cells(nb) for o in c.get("outputs", []))
    assert printed.count(": right: ") == len(exercise_cells(nb)) and "not yet" not in printed


def test_strip_solutions_keeps_the_indent_and_refuses_unpaired_markers():
    source = "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n\ncheck('x', judge, f)\n"
    assert "".join(student_notebook.strip_solutions(source)) == (
        "def f():\n    raise NotImplementedError(\"your turn\")\n\ncheck('x', judge, f)\n")
    for broken in ["### BEGIN SOLUTION\nx = 1\n", "x = 1\n### END SOLUTION\n",
                   "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n"]:
        with pytest.raises(ValueError, match="SOLUTION"):
            student_notebook.strip_solutions(broken)


def test_student_copy_runs_to_its_end_and_the_checkers_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("GRALORA_PRESET", "smoke")
    monkeypatch.setenv("TINY_GPT_CACHE", str(tmp_path / "cache"))
    student_notebook.main(str(NOTEBOOK), str(tmp_path / "student.ipynb"))
    nb = nbformat.read(tmp_path / "student.ipynb", as_version=4)
    assert not any(o for c in code_cells(nb) for o in c.outputs), "the student copy still has outputs"
    stubs = [c for c in code_cells(nb) if 'raise NotImplementedError("your turn")' in c.source]
    solutions = exercise_cells(nbformat.read(NOTEBOOK, as_version=4))
    assert len(stubs) == len(solutions) and not any(student_notebook.BEGIN in c.source for c in code_cells(nb))
    extra = [nbformat.v4.new_code_cell(c.source) for c in solutions]
    extra += [nbformat.v4.new_code_cell(f'check("wrong {n}", {judge}, {answer})')
              for n, (judge, answer, _) in enumerate(WRONG_ANSWERS)]
    nb.cells += extra
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("preset: smoke" in o.get("text", "") for o in outputs)
    printed = lambda cell: "".join(o.get("text", "") for o in cell.outputs)  # noqa: E731
    for cell in stubs:
        lines = printed(cell).splitlines()
        assert len(lines) == 1 and ": not yet: " in lines[0], f"an unsolved exercise printed {lines}"
    for cell in extra[:len(solutions)]:
        assert ": right: " in printed(cell), f"a worked solution does not pass its check: {printed(cell)}"
    for cell, (judge, answer, hint) in zip(extra[len(solutions):], WRONG_ANSWERS):
        assert ": not yet: " in printed(cell) and hint in printed(cell), f"{judge}({answer}): {printed(cell)}"


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
