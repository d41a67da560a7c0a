"""The recipe reference (docs/recipe-reference.md), generated from the schema so it cannot drift.

Keys, types, constraints and defaults come from the pydantic models in distill/recipe/schema.py. What a
key means comes from the ``#`` comments next to its field (the block just above it and the one
after it on its line) and from the section classes' docstrings, read from schema.py's source with
``tokenize`` and ``ast``: the comments stay where a reader of the schema sees them, nanoGPT style,
and are still machine-readable. tests/test_recipe_reference.py fails when the committed document
differs from what this module generates now.

    python -m distill.recipe_doc > docs/recipe-reference.md
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from distill.recipe import schema as config
from distill.recipe.overrides import section_model
from distill.recipe.schema import Recipe, Section

COMMAND = "python -m distill.recipe_doc > docs/recipe-reference.md"

# Class name -> field name -> the comment that explains it (joined into one line).
Comments = dict[str, dict[str, str]]


@dataclass(frozen=True)
class SectionDoc:
    """One section of the recipe: its dotted path, model, and how its parent declares it."""

    path: str
    model: type[BaseModel]
    comment: str  # the parent field's comment (``teacher.train``: when it is used)
    optional: bool  # ``X | None = None``: absent unless a recipe sets it


# Reading the source ---------------------------------------------------------------------------


def read_comments(source: str) -> tuple[Comments, dict[str, str]]:
    """(field comments, class docstrings) of every class in ``source``.

    A field's comment is the run of comment-only lines directly above it (no blank line between)
    followed by the comment after it on its own lines; each line's text is joined with spaces.
    """
    text, alone = _comment_lines(source)
    comments: Comments = {}
    docstrings: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        docstrings[node.name] = _paragraphs(ast.get_docstring(node) or "")
        fields = comments.setdefault(node.name, {})
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above: list[str] = []
                line = stmt.lineno - 1
                while line in alone:
                    above.insert(0, text[line])
                    line -= 1
                after = [text[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in text and n not in alone]
                fields[stmt.target.id] = " ".join(c for c in above + after if c)
    return comments, docstrings


def _comment_lines(source: str) -> tuple[dict[int, str], set[int]]:
    """line number -> comment text (without '#'); the lines that hold nothing but a comment."""
    text: dict[int, str] = {}
    alone: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line, col = tok.start
            text[line] = tok.string.lstrip("#").strip()
            if not tok.line[:col].strip():
                alone.add(line)
    return text, alone


def _paragraphs(docstring: str) -> str:
    """A docstring's paragraphs, each unwrapped onto one line, separated by blank lines."""
    return "\n\n".join(" ".join(p.split()) for p in docstring.split("\n\n") if p.strip())


def _inherited(model: type[BaseModel], table: dict[str, Any], default: Any) -> Any:
    """The first entry of ``table`` (keyed by class name) along the model's bases, skipping the
    generic Section: TeacherTrainConfig.batch_size keeps OptimConfig's comment unless it has one."""
    for cls in model.__mro__:
        if cls in (Section, BaseModel) or not issubclass(cls, BaseModel):
            continue
        found = table.get(cls.__name__)
        if found:
            return found
    return default


# Walking the schema ---------------------------------------------------------------------------


def sections(comments: Comments) -> list[SectionDoc]:
    """Every section below Recipe, depth first in declaration order (run, data, data.synthetic...)."""
    found: list[SectionDoc] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            sub = section_model(info.annotation)
            if sub is None:
                continue
            comment = _inherited(model, {k: v.get(name, "") for k, v in comments.items()}, "")
            optional = type(None) in typing.get_args(info.annotation)
            found.append(SectionDoc(prefix + name, sub, comment, optional))
            walk(sub, f"{prefix}{name}.")

    walk(Recipe, "")
    return found


def type_text(info: FieldInfo) -> str:
    """``int | null, >= 1``: the YAML-facing type and the schema's bounds."""
    bounds = _bounds(info.metadata)
    return f"`{_annotation_text(info.annotation)}`" + (f", {bounds}" if bounds else "")


def _annotation_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(map(_annotation_text, args)) + "]"
    if origin is list:
        return f"[{_annotation_text(args[0])}, ...]"
    if origin is dict:
        return "mapping"
    if args:  # X | None, Optional[X]
        return " | ".join(map(_annotation_text, args))
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    low = high = ""
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            low = f"[{m.ge}"
        elif isinstance(m, annotated_types.Gt):
            low = f"({m.gt}"
        elif isinstance(m, annotated_types.Le):
            high = f"{m.le}]"
        elif isinstance(m, annotated_types.Lt):
            high = f"{m.lt})"
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    if high:
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]
    return ""


# Rendering ------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Text for a Markdown table cell: '|' escaped everywhere, '<' outside code spans (GitHub
    would read ``<run>`` as an HTML tag and drop it)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def _section_markdown(section: SectionDoc, comments: Comments, docstrings: dict[str, str]) -> list[str]:
    lines = [f"## `{section.path}`", ""]
    intro = [
        _inherited(section.model, docstrings, ""),
        f"`{section.path}`: {section.comment}" if section.comment else "",
    ]
    if section.optional:
        intro.append(
            f"Absent by default (`{section.path}: null`). A recipe that sets it (`{section.path}: {{}}`, or any "
            f"of its keys, e.g. the override `{section.path}.{next(iter(section.model.model_fields))}=...`) "
            "gets the defaults below."
        )
    lines += [_escape(p) + "\n" for text in intro if text for p in text.split("\n\n")]
    lines += ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    defaults = section.model().model_dump(mode="json")
    for name, info in section.model.model_fields.items():
        if section_model(info.annotation) is not None:
            continue  # a subsection: its own heading follows
        meaning = _inherited(section.model, {k: v.get(name, "") for k, v in comments.items()}, "")
        default = _escape(f"`{json.dumps(defaults[name])}`")
        lines.append(f"| `{section.path}.{name}` | {_escape(type_text(info))} | {default} | {_escape(meaning)} |")
    return [*lines, ""]


def reference_markdown() -> str:
    """docs/recipe-reference.md: every recipe key with its type, default and meaning."""
    comments, docstrings = read_comments(inspect.getsource(config))
    lines = [
        "# Recipe reference",
        "",
        f"Generated from the schema in [`distill/recipe/schema.py`](../distill/recipe/schema.py) by `{COMMAND}`;",
        "do not edit by hand (`tests/test_recipe_reference.py` fails when it is out of date). The meaning",
        "of each key is the comment next to its field in `distill/recipe/schema.py` (blank where it has none).",
        "",
        "Set a key in a recipe's YAML section or override it on the command line as a dotted",
        "`section.key=value` pair (parsed as YAML). Unknown keys are errors. To see a recipe with every",
        "default filled in: `python -m distill.train RECIPE --print-recipe [overrides]`.",
        "",
    ]
    for section in sections(comments):
        lines += _section_markdown(section, comments, docstrings)
    return "\n".join(lines).rstrip("\n") + "\n"
