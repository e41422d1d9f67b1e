"""Wrap code lines over the line limit in the codebase's own style, not a formatter's.

    python tools/wrap_long_lines.py FILE...   (or: make wrap FILES="a.py b.py")

The code wraps by hand: a call's arguments run on, and the next line lines up under the first
argument (a visual indent). `ruff format` would instead explode every statement it touches to
one argument per line, so it is not run here. This script breaks each line that ruff reports as
E501 after the rightmost comma that fits, lining the rest up under its bracket; where no comma
fits it breaks after an open bracket (a hanging indent) or splits a string literal into two
adjacent literals. It keeps a change only if the file's AST is unchanged, so behaviour cannot
move; lines it cannot wrap (a long string outside brackets, a long comment) are listed for a
hand fix.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

LIMIT = 100
OPEN, CLOSE = "([{", ")]}"


def long_lines(path: Path) -> list[int]:
    """Line numbers ruff reports as too long, in the project's configuration."""
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff), "check", "--select", "E501", "--output-format", "concise",
                          str(path)], capture_output=True, text=True, check=False).stdout
    found = []
    for row in out.splitlines():
        parts = row.split(":")
        if len(parts) > 2 and parts[1].isdigit():
            found.append(int(parts[1]))
    return sorted(set(found))


def candidates(src: str, row: int) -> list[tuple[int, int, str, int]]:
    """Places to break line ``row``: ``(column to break at, new indent, kind, bracket depth)``."""
    lines = src.splitlines()
    line = lines[row - 1]
    own_indent = len(line) - len(line.lstrip())
    stack: list[tuple[int, int]] = []  # open brackets: (row, col)
    out: list[tuple[int, int, str, int]] = []
    prev = None
    closes: dict[tuple[int, int], tuple[int, int]] = {}
    in_target: dict[tuple[int, int], bool] = {}
    owner: list[tuple[int, tuple[int, int]]] = []  # comma candidate -> its bracket
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        (r, c), (er, ec) = tok.start, tok.end
        if r > row and not stack:
            break
        if tok.type == tokenize.OP and tok.string in OPEN:
            subscript = tok.string == "[" and prev is not None and (
                prev.type == tokenize.NAME or prev.string in CLOSE)
            first_here = not any(br == row for br, _ in stack)
            if (r == row and ec < LIMIT and ec < len(line.rstrip()) and not subscript
                    and first_here):
                out.append((ec, own_indent + 4, "hang", len(stack)))
            stack.append((r, c))
        elif tok.type == tokenize.OP and tok.string in CLOSE:
            if stack:
                closes[stack.pop()] = (r, c)
        elif tok.type == tokenize.NAME and tok.string in ("for", "in") and stack:
            in_target[stack[-1]] = tok.string == "for"
        elif r == row and stack and tok.type == tokenize.OP and tok.string == ",":
            if in_target.get(stack[-1]):
                continue  # ``for a, b in ...``: not a place to break
            br, bc = stack[-1]
            indent = bc + 1 if br == row else own_indent
            if ec < LIMIT:
                out.append((ec, indent, "comma", len(stack)))
                owner.append((len(out) - 1, stack[-1]))
        elif r == row and er == row and stack and tok.type == tokenize.STRING:
            indent = c  # the second literal lines up under the first
            text = tok.string
            start = min(i for i in (text.find('"'), text.find("'")) if i >= 0)
            prefix, quote = text[:start], text[start]
            if text[start:start + 3] in ('"""', "'''"):
                continue
            # split at a space inside the literal, the first part ending before the limit
            for cut in range(min(ec - 2, LIMIT - 1), c + start + 1, -1):
                body = line[c + start + 1:cut]
                if line[cut - 1] != " " or body.endswith("\\"):
                    continue
                if "f" in prefix.lower() and body.count("{") != body.count("}"):
                    continue
                out.append((cut, indent, "string:" + prefix + quote, len(stack)))
                break
        prev = tok
    # never split a short call such as ``f(a, b)`` that sits inside a longer line
    short = {i for i, (br, bc) in owner
             if closes.get((br, bc), (0, 0))[0] == br and closes[(br, bc)][1] - bc < 40}
    return [cand for i, cand in enumerate(out) if i not in short]


def try_break(src: str, row: int, tree: str) -> str | None:
    lines = src.splitlines(keepends=True)
    line = lines[row - 1].rstrip("\n")
    # commas first, then string splits, then hanging indents; the outermost bracket first
    order = {"comma": 0, "hang": 2}
    ranked = sorted(candidates(src, row), key=lambda t: (order.get(t[2], 1), t[3], -t[0]))
    for col, indent, kind, _depth in ranked:
        if kind.startswith("string:"):
            open_q = kind[len("string:"):]
            quote, prefix = open_q[-1], open_q[:-1]
            start = line.rfind(open_q, 0, col)
            head, tail = line[start + len(open_q):col], line[col:]
            # a part without a placeholder needs no f prefix
            p1 = prefix if "{" in head else prefix.replace("f", "").replace("F", "")
            p2 = prefix if "{" in tail.split(quote)[0] else prefix.replace("f", "").replace("F", "")
            first = line[:start] + p1 + quote + head + quote
            rest = " " * indent + p2 + quote + tail
            if len(first) > LIMIT:
                continue
        else:
            first = line[:col].rstrip()
            rest = " " * indent + line[col:].lstrip()
        if len(first) > LIMIT or not rest.strip() or len(rest.strip()) + indent <= indent:
            continue
        if kind == "comma" and indent >= LIMIT - 20:
            continue
        new = "".join(lines[:row - 1]) + first + "\n" + rest + "\n" + "".join(lines[row:])
        try:
            if ast.dump(ast.parse(new)) == tree:
                return new
        except SyntaxError:
            continue
    return None


def wrap(path: Path) -> list[int]:
    """Wrap ``path`` in place; returns the lines left too long."""
    src = path.read_text()
    tree = ast.dump(ast.parse(src))
    for _ in range(2000):
        todo = [n for n in range(1, len(src.splitlines()) + 1)
                if len(src.splitlines()[n - 1]) > LIMIT and n in set(long_lines_cache(path, src))]
        done = False
        for row in todo:
            new = try_break(src, row, tree)
            if new is not None:
                src = new
                done = True
                break
        if not done:
            break
    path.write_text(src)
    return long_lines(path)


def long_lines_cache(path: Path, src: str) -> list[int]:
    """ruff's E501 lines for the current text (ruff exempts some lines, e.g. a long URL)."""
    if _CACHE.get(path) != src:
        path.write_text(src)
        _CACHE[path] = src
        _LINES[path] = long_lines(path)
    return _LINES[path]


_CACHE: dict[Path, str] = {}
_LINES: dict[Path, list[int]] = {}


def main(argv: list[str]) -> int:
    left = 0
    for name in argv:
        path = Path(name)
        for row in wrap(path):
            left += 1
            print(f"{path}:{row}: still over {LIMIT} columns, wrap by hand")
    return 1 if left else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
