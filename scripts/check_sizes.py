"""The size bar of docs/architecture.md: classes over 300 lines and functions
over 80 lines in retrieval/ and index/ (exit status 1 when any is found).

    python scripts/check_sizes.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASS_LINES, FUNCTION_LINES = 300, 80


def sizes() -> list[tuple[int, str, int]]:
    """(lines, where, limit) of every class and function under retrieval/ and index/."""
    out = []
    for path in sorted([*ROOT.joinpath("retrieval").rglob("*.py"), *ROOT.joinpath("index").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {kind} {node.name}", limit))
    return sorted(out, reverse=True)


def main() -> int:
    over = [(n, where, limit) for n, where, limit in sizes() if n > limit]
    for n, where, limit in over:
        print(f"{n:5d} lines (bar {limit})  {where}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
