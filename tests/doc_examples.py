"""Code blocks of README.md and docs/*.md, read the way the docs test runs them.

A block is a fenced code block (```` ```lang ````), at any indentation (a block
inside a list item is dedented). What runs:

- ``python``: as a script (``python -`` in a fresh directory);
- ``sh`` / ``bash``: with ``bash -e`` (a ``curl`` that gets an HTTP error fails it);
- ``console``: the ``$ `` lines, as one ``bash -e`` script;
- ``toml``: through the node's config loader.

Other languages (``json``, ``text``, ``yaml``…) are output or data and are not run.

Markers, an HTML comment on the line before the block (invisible on a rendered page):

- ``<!-- fragment -->`` or ``<!-- fragment: why -->``: not meant to run on its own
  (a piece of a larger program, a command that starts a long-running node); the
  test reports it as skipped, with the reason;
- ``<!-- fails -->``: an example of an error: it must run and fail (exit non-zero).

Every new block in any doc is picked up: documentation written later is run
too, unless it says it is a fragment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

RUNNABLE = {"python": "python", "sh": "shell", "bash": "shell", "console": "console", "toml": "toml"}
"""fence language → how the block is run."""

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>fragment|fails)\b\s*:?\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True, slots=True)
class DocBlock:
    file: str
    """path relative to the repository root."""
    line: int
    """1-based line of the opening fence."""
    language: str
    text: str
    marker: str | None = None
    """``fragment``, ``fails`` or None."""
    reason: str = ""

    @property
    def kind(self) -> str | None:
        """How it runs (``python``, ``shell``, ``console``, ``toml``), or None for data and output."""
        return RUNNABLE.get(self.language)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}[{self.language}]"


def blocks_of(path: Path, root: Path = ROOT) -> list[DocBlock]:
    """Every fenced block of one markdown file, with the marker on the line before it."""
    lines = path.read_text().splitlines()
    out: list[DocBlock] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if closing is not None and closing.group("fence").startswith(fence[0] * len(fence)) \
                    and not closing.group("lang"):
                break
            line = lines[end]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            end += 1
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = _MARKER.match(previous)
        out.append(DocBlock(
            file=str(path.relative_to(root)), line=index + 1, language=opening.group("lang").lower(),
            text="\n".join(body) + "\n", marker=marker.group("kind") if marker else None,
            reason=marker.group("reason") if marker else "",
        ))
        index = end + 1
    return out


def all_blocks(files: tuple[Path, ...] = DOC_FILES) -> list[DocBlock]:
    return [block for path in files for block in blocks_of(path)]


def runnable_blocks(files: tuple[Path, ...] = DOC_FILES) -> list[DocBlock]:
    """The blocks the docs test runs or reports as skipped fragments."""
    return [block for block in all_blocks(files) if block.kind is not None]


def console_script(text: str) -> str:
    """The commands of a console transcript (``$ `` lines; a trailing ``\\`` continues one)."""
    commands: list[str] = []
    continuing = False
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append(line[2:])
        elif continuing:
            commands.append(line)
        else:
            continue
        continuing = line.endswith("\\")
    return "\n".join(commands) + "\n"


def point_at(text: str, port: int, *, documented_port: int = 38883) -> str:
    """The example with its node URL (``127.0.0.1:38883``/``localhost:38883``) on ``port``."""
    return re.sub(rf"(127\.0\.0\.1|localhost):{documented_port}\b", rf"\g<1>:{port}", text)
