"""Checks of the repository's shape: the core stands alone and stays lean, and the READMEs name only files that
exist.

    python -m pytest -q test_layout.py

The core (gralora.py, tiny_gpt/, tutorial.ipynb) must never import the study beside it (study/), and
gralora.py imports only torch and the standard library, so it can be copied alone. The core's Python
(gralora.py and tiny_gpt/*.py) stays under CORE_LINES lines, with no function longer than CORE_FUNCTION_LINES
(study/*.py: STUDY_FUNCTION_LINES) and no run of SAME_SHAPE_LINES code lines that has the same shape (the
same code but for names, numbers and strings) in two places.
"""

import ast
import collections
import io
import itertools
import json
import keyword
import re
import sys
import tokenize
from pathlib import Path

import pytest
import torch

import gralora
from conftest import randomize_B

ROOT = Path(__file__).resolve().parent
CORE = [ROOT / "gralora.py", *sorted((ROOT / "tiny_gpt").glob("*.py"))]
STUDY = sorted((ROOT / "study").glob("*.py"))
CORE_LINES, CORE_FUNCTION_LINES, STUDY_FUNCTION_LINES, SAME_SHAPE_LINES = 2000, 60, 80, 6


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


def test_graloralinear_can_be_lifted_alone(float64):
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
    base = torch.nn.Linear(12, 8)
    ours, copy = gralora.GraLoRALinear(base, 4, k=2, hybrid_r=2), lifted["GraLoRALinear"](base, 4, k=2, hybrid_r=2)
    copy.load_state_dict(randomize_B(ours).state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(copy(x), ours(x)) and not torch.equal(copy(x), base(x))


def test_gralora_imports_only_torch_and_the_standard_library():
    names = imported_modules((ROOT / "gralora.py").read_text())
    assert names - {"torch"} <= set(sys.stdlib_module_names), names


def test_imports_detects_study():  # the checks above could fail: the parser sees every import form
    assert imported_modules("import study.outliers\nfrom study import bench\ndef f():\n    import study\n") == {"study"}


PATHLIKE = re.compile(r"`([\w./-]+\.(?:py|json|png|txt|md|ipynb))`|\]\(([\w./-]+)\)")


@pytest.mark.parametrize("readme", ["README.md", "study/README.md"])
def test_readme_has_no_placeholder_left(readme):
    assert not re.findall(r"@@\w+@@", (ROOT / readme).read_text())


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
METHOD = ("_dims", "_check_args", "_check_fit", "_upcast", "AdapterLinear", "LoRALinear", "GraLoRALinear")


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


# ---------------------------------------------------------------- a lean core: size, function length, repetition


def relative(path):
    return str(Path(path).relative_to(ROOT))


def test_core_is_small():
    sizes = {relative(path): len(path.read_text().splitlines()) for path in CORE}
    assert sum(sizes.values()) < CORE_LINES, f"the core has {sum(sizes.values())} lines: {sizes}"


def long_functions(paths, limit):
    """'path:line name (N lines)' for every function or method in `paths` longer than `limit` lines, counted from
    its def line to its last line (docstring included)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{relative(path)}:{node.lineno} {node.name} ({length} lines)")
    return found


@pytest.mark.parametrize("part", ["core", "study"])
def test_no_long_functions(part):
    paths, limit = (CORE, CORE_FUNCTION_LINES) if part == "core" else (STUDY, STUDY_FUNCTION_LINES)
    found = long_functions(paths, limit)
    assert not found, f"{part} functions over {limit} lines: {found}"


def line_shapes(source):
    """(line number, shape) of each line that holds code. Its shape: names become x, numbers 0 and strings s
    (an f-string whole), keywords and operators stay. Left out: blank and comment lines, docstrings, import
    lines, lines of punctuation alone (a closing bracket), and the fields a class declares (`name: type =
    default`, a dataclass's data rather than code)."""
    left_out = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            left_out.update(range(body[0].lineno, body[0].end_lineno + 1))  # the docstring
        if isinstance(node, ast.ClassDef):
            for field in node.body:
                if isinstance(field, ast.AnnAssign):
                    left_out.update(range(field.lineno, field.end_lineno + 1))
    words = collections.defaultdict(list)  # line -> its words
    fstring = 0  # depth inside an f-string (Python 3.12+ tokenizes its parts)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind, line = tok.type, tok.start[0]
        if kind == getattr(tokenize, "FSTRING_START", None):
            fstring += 1
            if fstring == 1:
                words[line].append("s")
        elif kind == getattr(tokenize, "FSTRING_END", None):
            fstring -= 1
        elif fstring == 0 and kind in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING, tokenize.OP):
            word = {tokenize.NUMBER: "0", tokenize.STRING: "s", tokenize.OP: tok.string}.get(kind)
            words[line].append(word or (tok.string if keyword.iskeyword(tok.string) else "x"))
    return [(line, " ".join(ws)) for line, ws in sorted(words.items())
            if line not in left_out and ws[0] not in ("import", "from") and not set(ws) <= set("()[]{},:;")]


def same_shape_runs(paths, size=SAME_SHAPE_LINES, most_places=8):
    """'a.py:10-17 ~ b.py:40-47' for each pair of places in `paths` where `size` or more consecutive code lines
    (see line_shapes) have the same shapes; overlapping places in one file do not count. A run found in more
    than `most_places` places is too common to count (a table of data, say)."""
    places, numbers = collections.defaultdict(list), {}
    for path in paths:
        shapes = line_shapes(Path(path).read_text())
        numbers[path] = [line for line, _ in shapes]
        for i in range(len(shapes) - size + 1):
            places[tuple(shape for _, shape in shapes[i:i + size])].append((path, i))
    pairs = {(p, i, q, j) for where in places.values() if len(where) <= most_places
             for (p, i), (q, j) in itertools.combinations(where, 2) if p != q or abs(i - j) >= size}
    runs = []  # (p, first, last, q, first, last) in line_shapes' indices
    for p, i, q, j in sorted(pairs):
        if (p, i - 1, q, j - 1) not in pairs:  # the first window of its run
            end = i
            while (p, end + 1, q, end + 1 - i + j) in pairs:
                end += 1
            runs.append((p, i, end + size - 1, q, j, end - i + j + size - 1))

    def within(run, other):  # on both sides; a periodic stretch of code gives runs inside runs
        return (run[::3] == other[::3] and other[1] <= run[1] <= run[2] <= other[2]
                and other[4] <= run[4] <= run[5] <= other[5])

    kept = [run for run in runs if not any(other != run and within(run, other) for other in runs)]
    return [f"{relative(p)}:{numbers[p][a]}-{numbers[p][b]} ~ {relative(q)}:{numbers[q][c]}-{numbers[q][d]}"
            for p, a, b, q, c, d in kept]


def test_core_repeats_no_code():
    runs = same_shape_runs(CORE)
    assert not runs, f"the core repeats {SAME_SHAPE_LINES} or more lines of the same shape: {runs}"


def test_the_layout_checks_find_what_they_look_for(tmp_path):
    """Each check above could fail: a long function is found, and so are six lines of the same shape under other
    names (in one file or two), but five are not, nor a docstring, comments, imports or a class's fields."""
    block = "def {0}(a, b):\n    c = a + {1}\n    if c > b:\n        return [c, 'x']\n    d = f(c, b=2)\n" \
            "    e = d * 3  # note\n    return e\n"
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text('"""doc"""\nimport os\n' + block.format("f", 1) + "\n\n" + block.format("g", 7))
    two.write_text("from os import path\n# comment\n" + block.format("h", 5))
    global ROOT
    saved, ROOT = ROOT, tmp_path  # relative() counts from here
    try:
        assert same_shape_runs([one]) == ["one.py:3-9 ~ one.py:12-18"]
        assert same_shape_runs([one, two]) == ["one.py:3-9 ~ one.py:12-18", "one.py:3-9 ~ two.py:3-9",
                                               "one.py:12-18 ~ two.py:3-9"]
        assert same_shape_runs([one, two], size=8) == []  # the blocks share 7 lines
        fields = tmp_path / "fields.py"
        fields.write_text("".join(f"class C{i}:\n" + "".join(f"    a{j}: int = {j}\n" for j in range(8)) for i in range(2)))
        assert same_shape_runs([fields]) == []
        assert long_functions([one], 6) == ["one.py:3 f (7 lines)", "one.py:12 g (7 lines)"]
        assert long_functions([one], 7) == []
    finally:
        ROOT = saved
