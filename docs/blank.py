"""Blank functions for an exercise (README.md, "Exercises"): each named function keeps its signature and docstring,
and its body becomes `raise NotImplementedError  # exercise`. Methods are named Class.method.

    python docs/blank.py discon.py cosine_betas GaussianDiffusion.q_sample
"""
import ast
import sys


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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, names = sys.argv[1], set(sys.argv[2:])
    found = blank(path, names)
    print("blanked:", ", ".join(sorted(found)) or "nothing")
    if names - found:
        sys.exit(f"not found in {path}: {', '.join(sorted(names - found))} (methods are named Class.method)")
