"""Recipe loading's words: dotted overrides parsed and applied, and the messages for what goes
wrong (a misspelt key, a bare field name, the recipe and its overrides swapped, a recipe named
without its path). Generic over the schema's root model, which ``schema.load_recipe`` passes.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distill.errors import RecipeError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # the repository's recipes, when present


def _section_fields(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Valid keys at ``path`` (a pydantic error location) inside the schema."""
    current: Any = model
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section (model class) inside ``X``, ``X | None`` or ``Optional[X]``; None for a value
    field. keys.py and recipe_doc.py walk the schema with it too."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside ``X``, ``X | None`` or ``Optional[X]``, else the annotation."""
    return section_model(annotation) or annotation


def format_errors(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pydantic's errors as one line each, an unknown key with the closest valid one."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(root, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(map(str, (*loc[:-1], close[0])))}'?" if close else ""
            lines.append(f"unknown key '{dotted}'{hint} (valid here: {', '.join(valid)})")
        else:
            got = e.get("input")
            got_txt = f" (got {got!r})" if not isinstance(got, dict) else ""
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"'{dotted}': {msg}{got_txt}")
    return f"invalid recipe {source}:\n  " + "\n  ".join(lines)


def parse_override(text: str, root: type[BaseModel] | None = None) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML). With the schema's ``root``, a bare
    field name (``epochs=3``) is refused with the dotted keys that hold it."""
    if "=" not in text:
        raise RecipeError(f"bad override '{text}': expected dotted.key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"bad override '{text}': empty key part in '{key}'")
    if root is not None and len(parts) == 1 and parts[0] not in root.model_fields:
        _bare_key(text, parts[0], root)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"bad override '{text}': value is not valid YAML ({exc})") from None
    return parts, value


def _is_value_field(parts: list[str], root: type[BaseModel]) -> bool:
    """True when ``parts`` names a plain value (not a section or a free-form mapping)."""
    current: Any = root
    for part in parts:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return False
        field = current.model_fields.get(part)
        if field is None:
            return False
        current = _model_in(field.annotation)
    is_section = isinstance(current, type) and issubclass(current, BaseModel)
    return not is_section and typing.get_origin(current) is not dict


def apply_override(tree: dict[str, Any], parts: list[str], value: Any, text: str, root: type[BaseModel]) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        child = node.get(part)
        if child is None and _is_value_field(parts[: i + 1], root):
            raise RecipeError(f"bad override '{text}': '{where}' is a value, not a section")
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"bad override '{text}': '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _leaf_paths(model: type[BaseModel], name: str, prefix: str = "") -> list[str]:
    """Every dotted key whose last part is ``name``, sections walked in the schema's order."""
    out: list[str] = []
    for field, info in model.model_fields.items():
        sub = section_model(info.annotation)
        if sub is not None:
            out += _leaf_paths(sub, name, f"{prefix}{field}.")
        elif field == name:
            out.append(prefix + field)
    return out


def _bare_key(text: str, name: str, root: type[BaseModel]) -> None:
    """Refuse ``epochs=3``: keys are dotted paths; name the ones that end in ``name``."""
    owners = _leaf_paths(root, name)
    if not owners:
        close = difflib.get_close_matches(name, {p.rsplit(".", 1)[-1] for p in _leaf_paths_all(root)}, n=1)
        owners = _leaf_paths(root, close[0]) if close else []
    owners.sort(key=lambda p: p.count("."))  # train.epochs before teacher.train.epochs
    value = text.split("=", 1)[1]
    hint = f"did you mean {' or '.join(f'{o}={value}' for o in owners[:3])}?" if owners else "e.g. train.epochs=3"
    raise RecipeError(f"bad override '{text}': keys are dotted paths (section.key); {hint}")


def _leaf_paths_all(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for field, info in model.model_fields.items():
        sub = section_model(info.annotation)
        out += _leaf_paths_all(sub, f"{prefix}{field}.") if sub is not None else [prefix + field]
    return out


def missing_recipe(path: Path, overrides: Sequence[str]) -> str:
    """Why ``path`` is no recipe file, and what probably was meant: overrides come after the
    recipe; a recipe's bare name (``quickstart``) is the file recipes/quickstart.yaml."""
    text = str(path)
    if "=" in text:
        files = [o for o in overrides if "=" not in o]
        recipe = files[0] if files else "RECIPE.yaml"
        return (
            f"'{text}' is an override, not a recipe file: the recipe comes first, then the overrides ({recipe} {text})"
        )
    candidates = [Path("recipes") / f"{path.name}.yaml", RECIPES / f"{path.name}.yaml"]
    if path.suffix in ("", ".yml"):
        candidates = [path.with_suffix(".yaml"), *candidates]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and RECIPES.is_dir():
        names = [r.stem for r in sorted(RECIPES.glob("*.yaml"))]
        close = difflib.get_close_matches(path.stem, names, n=1, cutoff=0.6)
        found = RECIPES / f"{close[0]}.yaml" if close else None
    if found is not None:
        shown = found.relative_to(Path.cwd()) if found.is_relative_to(Path.cwd()) else found
        return f"recipe file not found: {text}; did you mean {shown}?"
    return f"recipe file not found: {text} (pass the path of a YAML recipe, e.g. recipes/quickstart.yaml)"
