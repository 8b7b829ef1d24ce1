"""Blank functions for an exercise (README.md, "Exercises"), or check README's exercise table.

    python docs/blank.py discon.py cosine_betas GaussianDiffusion.q_sample   # blank these, in place
    python docs/blank.py --matrix                                             # blank each row in turn, run every row

Blanking keeps each named function's signature and docstring and makes its body `raise NotImplementedError  #
exercise`; methods are named Class.method. --matrix works on a copy of the repository: for each row of README's table
it blanks that row's functions, runs the tests of every row, and prints which rows fail. A row must fail with its own
blank and with those of the rows it needs (named in README's "needs" column, or needed by those), and with no other;
the script prints each row's smallest "needs" and exits non-zero where README's column says otherwise.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blank(path, names):
    """Rewrite the file at path with the functions in names blanked -> the names found."""
    source = open(path).read()
    lines, bodies = source.split("\n"), []
    for top in ast.parse(source).body:
        methods = top.body if isinstance(top, ast.ClassDef) else []
        for node, prefix in [(top, "")] + [(method, top.name + ".") for method in methods]:
            if isinstance(node, ast.FunctionDef) and prefix + node.name in names:
                has_docstring = isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                first = node.body[1 if has_docstring else 0]
                bodies.append((first.lineno, node.end_lineno, " " * first.col_offset, prefix + node.name))
    for start, end, indent, _ in sorted(bodies, reverse=True):  # from the bottom, so that line numbers stay valid
        lines[start - 1:end] = [indent + "raise NotImplementedError  # exercise"]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return {name for *_, name in bodies}


def exercises():
    """{row: (function names, -k key, rows named in "needs")} from README's exercise table."""
    table = re.findall(r"^\| (\d+) \| (.*?) \|.*?\| ([-\d, ]+) \| `python -m pytest -q test_discon.py -k (\w+)`",
                       open(os.path.join(REPO, "README.md")).read(), re.M)
    return {int(n): (re.findall(r"`([\w.]+)`", names), key, {int(x) for x in re.findall(r"\d+", needs)})
            for n, names, needs, key in table}


def failing_rows(rows, blanked):
    """The rows whose tests fail in a copy of the repository with row `blanked`'s functions blanked."""
    with tempfile.TemporaryDirectory() as copy:
        for name in ("discon.py", "fid.py", "data.py", "train.py", "sample.py", "bench.py", "test_discon.py",
                     "README.md"):
            shutil.copy(os.path.join(REPO, name), copy)
        names = rows[blanked][0]
        for module in ("discon", "fid"):
            mine = {n.removeprefix("fid.") for n in names if n.startswith("fid.") == (module == "fid")}
            if mine and blank(os.path.join(copy, module + ".py"), mine) != mine:
                sys.exit(f"row {blanked}: not all of {sorted(mine)} are in {module}.py")
        keys = " or ".join(key for _, key, _ in rows.values())
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                               "test_discon.py", "-k", keys], cwd=copy, capture_output=True, text=True)
        failed = re.findall(r"^(?:FAILED|ERROR) test_discon.py::(test_\w+)", done.stdout, re.M)
        return {n for n, (_, key, _) in rows.items() if any(key in test for test in failed)}


def closure(rows, n):
    """Row n and every row it needs, directly or through the rows it needs."""
    seen, todo = set(), [n]
    while todo:
        row = todo.pop()
        if row not in seen:
            seen.add(row)
            todo += rows[row][2]
    return seen


def matrix():
    rows = exercises()
    fails = {b: failing_rows(rows, b) for b in rows}                 # blank b -> the rows that fail
    print("blank -> rows failing\n" + "\n".join(f"{b:>5} -> {sorted(fails[b])}" for b in rows))
    by = {n: {b for b in rows if n in fails[b]} for n in rows}        # row n -> the blanks that make it fail
    wrong = 0
    for n in rows:  # its smallest needs: the blanks that fail it, less those that fail it through another one
        smallest = sorted(b for b in by[n] - {n} if not any(b in by[c] for c in by[n] - {n, b}))
        ok = n in by[n] and closure(rows, n) == by[n]
        wrong += not ok
        print(f"row {n:>2}: fails with {sorted(by[n])}; needs {', '.join(map(str, smallest)) or '-'}"
              + ("" if ok else f"  <- README says {', '.join(map(str, sorted(rows[n][2]))) or '-'}"))
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    if sys.argv[1:] == ["--matrix"]:
        matrix()
    elif len(sys.argv) < 3:
        sys.exit(__doc__)
    else:
        path, names = sys.argv[1], set(sys.argv[2:])
        found = blank(path, names)
        print("blanked:", ", ".join(sorted(found)) or "nothing")
        if names - found:
            sys.exit(f"not found in {path}: {', '.join(sorted(names - found))} (methods are named Class.method)")
