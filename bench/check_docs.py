"""Checks the links of the README and docs/ pages: every one must lead somewhere (`make docs`).

    python bench/check_docs.py [FILE.md ...]        # default: README.md and docs/*.md

- a relative link `[text](path)` or image `![alt](path)` must name a file or folder that exists (relative to the
  page's own folder); `(path#anchor)` and `(#anchor)` must also name a heading of that page (GitHub's anchors);
- a repo path in backticks (`conf/...`, `umec_lightning/...`, `bench/...`, `tests/...`, `docs/...`, `callbacks/...`;
  or any `a/b.py`, `a/b.yaml`, found at the root or under umec_lightning/) must exist. `<placeholder>` and `*` match
  any name, `{a,b}` each of its choices, so `conf/mode/<mode>.yaml` passes while one mode file exists.

Fenced and indented code blocks are skipped (their commands name placeholders and output paths). Prints
`file:line: ...` for each broken one and exits 1; exits 0 silently otherwise. Standard library only, so it runs
without the venv.
"""

from __future__ import annotations

import glob
import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("conf/", "umec_lightning/", "bench/", "tests/", "docs/", "callbacks/")
SUFFIXES = (".py", ".yaml", ".md")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = [c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN"]
    return "".join(kept).replace(" ", "-")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside code blocks; code lines come back empty so spans cannot cross
    them."""
    out: list[tuple[int, str]] = []
    fence = None
    prev_blank_or_code = True
    in_list = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence:
            if marker and stripped.startswith(fence):
                fence = None
            out.append((number, ""))
            continue
        if marker:
            fence = marker.group(1)
            out.append((number, ""))
            continue
        if not stripped:
            out.append((number, ""))
            prev_blank_or_code = True
            continue
        indent = len(line) - len(stripped)
        if indent >= 4 and prev_blank_or_code and not in_list:
            out.append((number, ""))  # an indented code block
            continue
        if indent == 0:
            in_list = bool(re.match(r"([-*+]|\d+\.)\s", stripped))
        prev_blank_or_code = False
        out.append((number, line))
    return out


def anchors(path: Path, cache: dict[Path, set[str]]) -> set[str]:
    if path not in cache:
        seen: dict[str, int] = {}
        found: set[str] = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            match = HEADING.match(line)
            if not match:
                continue
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        cache[path] = found
    return cache[path]


def expand(token: str) -> list[str]:
    """`{a,b}` choices written out (one level)."""
    match = re.search(r"\{([^{}]*)\}", token)
    if not match:
        return [token]
    return [out for choice in match.group(1).split(",")
            for out in expand(token[:match.start()] + choice + token[match.end():])]


def path_exists(token: str) -> bool:
    for choice in expand(token):
        pattern = re.sub(r"<[^<>]*>", "*", choice)
        for base in (ROOT, ROOT / "umec_lightning"):
            if any(True for _ in glob.iglob(str(base / pattern))):
                break
        else:
            return False
    return True


def repo_path(token: str) -> str | None:
    """The repo path a backticked token names, or None when it names none."""
    token = token.strip("\"'()[],;.:")
    if "://" in token or "=" in token or token.startswith(("/", "~", "$", "-")) or "/" not in token:
        return None
    if token.startswith(PREFIXES):
        return token
    first = token.split("/", 1)[0]
    if token.endswith(SUFFIXES) and re.fullmatch(r"[A-Za-z_][\w.-]*", first) and first not in ("..", "."):
        return token
    return None


def check_paragraph(page: Path, rel: Path, paragraph: list[tuple[int, str]], cache: dict[Path, set[str]]) -> list[str]:
    problems: list[str] = []
    text = "\n".join(line for _, line in paragraph)
    starts = [0]
    for _, line in paragraph[:-1]:
        starts.append(starts[-1] + len(line) + 1)

    def line_of(position: int) -> int:
        return next(number for start, (number, _) in zip(reversed(starts), reversed(paragraph)) if start <= position)

    for span in CODE_SPAN.finditer(text):
        for token in span.group(2).split():
            path = repo_path(token)
            if path and not path_exists(path):
                problems.append(f"{rel}:{line_of(span.start())}: `{path}` is not in the repo")
    blanked = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)
    for link in LINK.finditer(blanked):
        target = link.group(1)
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # a URL, mailto:, ...
        where = f"{rel}:{line_of(link.start())}"
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{where}: link ({target}): no such file {path_part}")
            continue
        if anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest, cache):
            problems.append(f"{where}: link ({target}): {dest.name} has no heading #{anchor}")
    return problems


def check(page: Path, cache: dict[Path, set[str]]) -> list[str]:
    problems: list[str] = []
    rel = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    # A span may run over a line break (markdown joins a paragraph's lines), never over a blank line.
    paragraphs: list[list[tuple[int, str]]] = [[]]
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        if line.strip():
            paragraphs[-1].append((number, line))
        elif paragraphs[-1]:
            paragraphs.append([])
    for paragraph in paragraphs:
        if paragraph:
            problems += check_paragraph(page, rel, paragraph, cache)
    return sorted(problems, key=lambda problem: int(problem.split(":")[1]))


def main(argv: list[str]) -> int:
    pages = [Path(a).resolve() for a in argv] or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cache: dict[Path, set[str]] = {}
    problems = [p for page in pages for p in check(page, cache)]
    for problem in problems:
        print(problem)
    sys.stdout.flush()
    if problems:
        print(f"{len(problems)} broken link(s) in {len(pages)} page(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
