"""Write (or with --check, verify) docs/ERRORS.md's list from the code: every ``raise L2BError(...)``.

Each entry is the message as the code builds it, with ``…`` where a value (a path, a number, a
name) is filled in; the message itself says what to do. Run after adding or changing an error.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ERRORS.md"
BEGIN, END = "<!-- errors:begin (tools/errors_doc.py) -->", "<!-- errors:end -->"


def render(node: ast.AST) -> str:
    """The static text of a message expression; ``…`` for what is computed."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(render(v) if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return render(node.left) + render(node.right)
    return "…"


def messages(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(module, function, message template) of every ``raise L2BError(...)`` under src/l2b."""
    found = []
    for path in sorted((root / "src" / "l2b").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(fn):
                if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                        and getattr(node.exc.func, "id", None) == "L2BError" and node.exc.args):
                    text = " ".join(render(node.exc.args[0]).split())
                    item = (str(path.relative_to(root / "src")), fn.name, text)
                    if item not in found:
                        found.append(item)
    return found


def table(root: Path = ROOT) -> str:
    rows, module = [], None
    for mod, fn, text in messages(root):
        if mod != module:
            module = mod
            rows += ["", f"### `{mod}`", "", "| where | message (… = a value filled in) |", "|---|---|"]
        cell = text.replace("|", "\\|")
        rows.append(f"| `{fn}` | {cell} |")
    return "\n".join(rows).strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python tools/errors_doc.py")
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
