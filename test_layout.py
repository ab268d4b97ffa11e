"""Checks of the repository's shape: the core stands alone, and the READMEs name only files that exist.

    python -m pytest -q test_layout.py

The core (gralora.py, tiny_gpt/, tutorial.ipynb) must never import the study beside it (study/), and
gralora.py imports only torch and the standard library, so it can be copied alone.
"""

import ast
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
CORE = [ROOT / "gralora.py", *sorted((ROOT / "tiny_gpt").glob("*.py"))]


def imported_modules(source):
    """Top-level names of every module imported anywhere in `source` (relative imports as '.')."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def notebook_code():
    cells = json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]
    lines = "".join("".join(c["source"]) + "\n" for c in cells if c["cell_type"] == "code").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # no IPython magics


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_not_import_the_study(path):
    assert "study" not in imported_modules(path.read_text())


def test_notebook_does_not_import_the_study():
    assert "study" not in imported_modules(notebook_code())


def test_gralora_imports_only_torch_and_the_standard_library():
    names = imported_modules((ROOT / "gralora.py").read_text())
    assert names - {"torch"} <= set(sys.stdlib_module_names), names


def test_imports_detects_study():  # the checks above could fail: the parser sees every import form
    assert imported_modules("import study.outliers\nfrom study import bench\ndef f():\n    import study\n") == {"study"}


PATHLIKE = re.compile(r"`([\w./-]+\.(?:py|json|png|txt|md|ipynb))`|\]\(([\w./-]+)\)")


@pytest.mark.parametrize("readme", ["README.md", "study/README.md"])
def test_readme_names_only_files_that_exist(readme):
    """Backticked paths count from the repository root; markdown links and images from the README's folder."""
    text = (ROOT / readme).read_text()
    missing = []
    for match in PATHLIKE.finditer(text):
        code_path, link = match.groups()
        if link and not link.startswith(("http", "#")):
            if not ((ROOT / readme).parent / link).exists():
                missing.append(link)
        elif code_path and "/" in code_path and not (ROOT / code_path).exists():
            missing.append(code_path)
    assert not missing, f"{readme} names files that are not in the repository: {missing}"
