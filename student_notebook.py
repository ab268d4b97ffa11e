"""Writes the version of the class to hand out: tutorial.ipynb with its solutions replaced and its outputs cleared.

    python student_notebook.py          # writes tutorial_student.ipynb

A solution is every line between `### BEGIN SOLUTION` and `### END SOLUTION` in a code cell (nbgrader's
convention); the student's copy has `raise NotImplementedError("your turn")` in its place, at the same indent.
"""

import json

BEGIN, END, STUB = "### BEGIN SOLUTION", "### END SOLUTION", 'raise NotImplementedError("your turn")\n'


def strip_solutions(source):
    """The lines of one code cell's source, each solution replaced by STUB."""
    lines, inside = [], False
    for line in source.splitlines(keepends=True):
        marker = line.strip()
        if marker == BEGIN and not inside:
            inside = True
            lines.append(line[: len(line) - len(line.lstrip())] + STUB)
        elif marker == END and inside:
            inside = False
        elif marker in (BEGIN, END):
            raise ValueError(f"{marker!r} out of order in this cell:\n{source}")
        elif not inside:
            lines.append(line)
    if inside:
        raise ValueError(f"{BEGIN!r} without {END!r} in this cell:\n{source}")
    return lines


def main(src="tutorial.ipynb", dst="tutorial_student.ipynb"):
    with open(src, encoding="utf-8") as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["source"] = strip_solutions("".join(cell["source"]))
            cell["outputs"], cell["execution_count"] = [], None
            cell["metadata"].pop("execution", None)  # nbclient's timings
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {dst}: solutions replaced by stubs, outputs cleared")


if __name__ == "__main__":
    main()
