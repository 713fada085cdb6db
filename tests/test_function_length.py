"""No function in the package runs over MAX_LINES lines: a stage loop reads as numbered steps that
call named pieces, and a long function is split by meaning. Checked by walking every module with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "stackllama_ds"
MAX_LINES = 80


def _lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, def line, lines) of every function in ``path``: module level, methods, nested.

    Lines count from the ``def`` line (decorators excluded) to the function's last line, docstring included.
    """
    out: list[tuple[str, int, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)  # functions inside if/try/with blocks

    walk(ast.parse(path.read_text(), str(path)), "")
    return out


def test_lengths_count_def_to_last_line_with_methods_and_nested(tmp_path):
    src = "@dec\ndef f():\n    '''doc'''\n    def g():\n        pass\n    return g\n\n\nclass C:\n    def m(self):\n        pass\n"
    p = tmp_path / "probe.py"
    p.write_text(src)
    assert _lengths(p) == [("f", 2, 5), ("f.g", 4, 2), ("C.m", 10, 2)]


def test_no_function_over_max_lines():
    long = [f"{p.relative_to(PKG)}:{line} {name} ({n} lines)"
            for p in sorted(PKG.rglob("*.py")) for name, line, n in _lengths(p) if n > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines (split them by meaning into named pieces):\n  " + \
        "\n  ".join(long)
