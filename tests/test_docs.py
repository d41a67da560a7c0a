"""The README and docs/ stay in step with the package: read from the files, so they cannot drift.

The README is the front door (short, with a table of every command); docs/development.md names
every subpackage; relative links and the package paths the pages name exist; and no file of the
repository cites a file outside it. Fast: text only, nothing imported from distill.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distill"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 220
# Modules at the top of distill/ that are not commands.
NOT_COMMANDS = {"__init__", "__main__", "entrypoint", "errors"}
# What the repository consists of, for the check on citations of outside files.
SCANNED = ["README.md", "docs", "distill", "tests", "recipes", "scripts", "Makefile", "pyproject.toml"]
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json", ".csv", ""}
# Files outside the repository that nothing in it may cite (assembled so this file names none).
OUTSIDE = ("PRODUCT" + ".md", "STYLE" + ".md", ".." + "/shared")
# A folder of reference papers beside the repository, cited as reference/<name>.md.
OUTSIDE_REFERENCE = re.compile(r"(?<![\w/-])" + "reference" + r"/[\w.-]+\.md\b")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
PATH_MENTION = re.compile(r"\b((?:distill|tests|scripts)/[\w/.-]*\w\.(?:py|sh))\b")
MODULE_MENTION = re.compile(r"\bdistill(?:\.\w+)+")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def command_modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py")} - NOT_COMMANDS


def subpackages() -> set[str]:
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def prose(text: str) -> str:
    """Markdown without fenced code blocks (links and headings there are not links or headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def table_first_cells(text: str) -> list[str]:
    """The first cell of every Markdown table row, without its backticks."""
    cells = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            cells.append(line.split("|")[1].strip().strip("`"))
    return cells


def section(text: str, title: str) -> str:
    """The body of the '## title' section, up to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_tables_every_command_module() -> None:
    commands = command_modules()
    assert {"train", "compare", "export", "launch"} <= commands  # the package layout was found
    cells = set(table_first_cells(README.read_text()))
    missing = sorted(commands - cells)
    assert not missing, f"README.md's table of commands lacks {missing} (one row each, first cell `name`)"


def test_development_layout_names_every_subpackage() -> None:
    folders = subpackages()
    assert {"recipe", "training", "models"} <= folders  # the package layout was found
    layout = section((DOCS / "development.md").read_text(), "Layout")
    missing = sorted(f for f in folders if f"distill/{f}/" not in layout)
    assert not missing, f"docs/development.md's Layout section does not name distill/<name>/ for {missing}"


def test_no_file_cites_a_file_outside_the_repository() -> None:
    hits = []
    for name in SCANNED:
        root = ROOT / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix not in TEXT_SUFFIXES or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
                hits += [f"{path.relative_to(ROOT)}:{number}: {word}" for word in OUTSIDE if word in line]
                hits += [f"{path.relative_to(ROOT)}:{number}: {m}" for m in OUTSIDE_REFERENCE.findall(line)]
    assert not hits, "files cite files outside the repository:\n" + "\n".join(hits)


def test_relative_links_point_at_files_that_exist() -> None:
    broken = []
    for page in pages():
        text = INLINE_CODE.sub("", prose(page.read_text()))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_package_paths_and_modules_named_in_the_docs_exist() -> None:
    missing = []
    for page in pages():
        text = page.read_text()
        for path in sorted(set(PATH_MENTION.findall(text))):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
        for dotted in sorted(set(MODULE_MENTION.findall(text))):
            parts = dotted.split(".")[1:]
            if parts == ["X"]:  # "python -m distill.X": the placeholder for any command
                continue
            top = PACKAGE / parts[0]
            if top.is_dir() and len(parts) > 1:
                found = (top / f"{parts[1]}.py").exists()
            else:
                found = top.with_suffix(".py").exists() or top.is_dir()
            if not found:
                missing.append(f"{page.relative_to(ROOT)}: {dotted}")
    assert not missing, "pages name package paths or modules that do not exist:\n" + "\n".join(missing)
