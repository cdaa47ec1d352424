"""The fenced Python blocks of README.md and docs/, each with the marker on the line before it:

- ``<!-- block: NAME -->``: a program a test runs by name (``block("my_train.py")``), as written;
- ``<!-- not-run: REASON -->``: not runnable on its own, and why;
- no marker: a self-contained snippet, run as a script by ``tests/test_docs.py``.

A block indented under a list item is read without its indentation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^( *)```python\s*$")
MARKER = re.compile(r"^\s*<!-- (block|not-run): (.+?) -->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    kind: str  # "block", "not-run" or "snippet"
    label: str  # the block's name, the reason, or ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        fence = FENCE.match(line)
        if not fence:
            continue
        indent = len(fence.group(1))
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = "\n".join(text[indent:] for text in lines[i + 1 : end]) + "\n"
        marker = MARKER.match(lines[i - 1]) if i else None
        kind, label = (marker.group(1), marker.group(2)) if marker else ("snippet", "")
        found.append(Block(path, i + 1, code, kind, label))
    return found


def all_blocks() -> list[Block]:
    return [b for path in markdown_files() for b in blocks_of(path)]


def block(name: str) -> str:
    """The program named ``name`` (every copy of it in the README and docs is the same: tests/test_docs.py)."""
    copies = [b for b in all_blocks() if b.kind == "block" and b.label == name]
    if not copies:
        raise LookupError(f"no block named {name!r} in README.md or docs/")
    return copies[0].code
