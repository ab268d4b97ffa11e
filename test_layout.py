"""Checks of the repository's shape: the core stands alone, and the READMEs name only files that exist.

    python -m pytest -q test_layout.py

The core (gralora.py, tiny_gpt/, tutorial.ipynb) must never import the study beside it (study/), and
gralora.py imports only torch and the standard library, so it can be copied alone.
"""

import ast
import io
import json
import re
import sys
import tokenize
from pathlib import Path

import pytest
import torch

import gralora

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
    code = notebook_code()
    assert "study" not in imported_modules(code)
    assert not re.search(r"import_module\(\s*['\"]study", code), "the notebook imports study/ by name"


def test_graloralinear_can_be_lifted_alone():
    """GraLoRALinear's docstring says which definitions to copy with it; copied alone (with the file's imports),
    they compute what the module's layer computes."""
    source = (ROOT / "gralora.py").read_text()
    names = re.search(r"copy ([\w, ]+) and\s+this class", source).group(1).replace(",", " ").split()
    tree = ast.parse(source)
    imports = [ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    parts = [ast.get_source_segment(source, n) for n in tree.body if getattr(n, "name", None) in {*names, "GraLoRALinear"}]
    assert len(parts) == len(names) + 1, names
    lifted = {}
    exec("\n".join(imports + parts), lifted)
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 8, dtype=torch.float64)
    ours, copy = gralora.GraLoRALinear(base, 4, k=2, hybrid_r=2), lifted["GraLoRALinear"](base, 4, k=2, hybrid_r=2)
    with torch.no_grad():
        ours.B.normal_()
        ours.hybrid_B.normal_()
    copy.load_state_dict(ours.state_dict())
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.equal(copy(x), ours(x)) and not torch.equal(copy(x), base(x))


def test_gralora_imports_only_torch_and_the_standard_library():
    names = imported_modules((ROOT / "gralora.py").read_text())
    assert names - {"torch"} <= set(sys.stdlib_module_names), names


def test_imports_detects_study():  # the checks above could fail: the parser sees every import form
    assert imported_modules("import study.outliers\nfrom study import bench\ndef f():\n    import study\n") == {"study"}


PATHLIKE = re.compile(r"`([\w./-]+\.(?:py|json|png|txt|md|ipynb))`|\]\(([\w./-]+)\)")


@pytest.mark.parametrize("readme", ["README.md", "study/README.md"])
def test_readme_names_only_files_that_exist(readme):
    """Backticked paths under a folder of the repository count from its root; markdown links and images from
    the README's folder."""
    text = (ROOT / readme).read_text()
    missing = []
    for match in PATHLIKE.finditer(text):
        code_path, link = match.groups()
        if link and not link.startswith(("http", "#")):
            if not ((ROOT / readme).parent / link).exists():
                missing.append(link)
        elif code_path and "/" in code_path and (ROOT / code_path.split("/")[0]).is_dir() \
                and not (ROOT / code_path).exists():  # a repository path (not e.g. the stdlib's json/decoder.py)
            missing.append(code_path)
    assert not missing, f"{readme} names files that are not in the repository: {missing}"


# The README states the method's size the way small classics do; this is the count, and the test keeps it true.
METHOD = ("_is_int", "_is_conv1d", "_check_args", "_upcast", "AdapterLinear", "LoRALinear", "GraLoRALinear")


def code_lines(path, names=None):
    """Lines holding code (not docstrings, comments or blank lines) in the top-level definitions `names`
    of a Python file, or in the whole file when names is None."""
    source = Path(path).read_text()
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    code -= docstrings
    if names is None:
        return len(code)
    spans = [range(node.lineno, node.end_lineno + 1) for node in tree.body if getattr(node, "name", None) in names]
    assert len(spans) == len(names), "a definition named in METHOD is missing from gralora.py"
    return sum(len(code.intersection(span)) for span in spans)


def test_readme_states_the_method_size():
    method, whole = code_lines(ROOT / "gralora.py", METHOD), code_lines(ROOT / "gralora.py")
    readme = (ROOT / "README.md").read_text()
    assert f"{method} lines of code" in readme and f"{whole} in the whole file" in readme, (method, whole)


def test_code_lines_counts_code_only(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""doc"""\n\n# comment\ndef f(x):\n    """doc\n    more"""\n    y = (x +\n         1)  # note\n'
                    '    return y\n\n\nclass C:\n    pass\n')
    assert code_lines(path, ("f",)) == 4 and code_lines(path) == 6
