"""Class names a model records (timm's ``label_names``) and how messages list them."""

from __future__ import annotations

from typing import Any

from distill.errors import DistillError


def name_list(names: list[str], limit: int = 30) -> str:
    """``'a', 'b', 'c'`` for messages; a long list shows its first ``limit`` and the count."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def read_label_names(
    raw: Any, num_classes: int | None, where: str, error: type[DistillError] = DistillError
) -> list[str] | None:
    """The class names a model records in timm's ``label_names`` (a list, or an {index: name}
    dict), one per output in output order; None when it records none."""
    if not raw:
        return None
    if isinstance(raw, dict):
        by_index = {int(k): str(v) for k, v in raw.items()}
        if sorted(by_index) != list(range(len(by_index))):
            raise error(f"{where}: label_names does not name every output 0..{max(by_index)}; give one name per output")
        names = [by_index[i] for i in range(len(by_index))]
    else:
        names = [str(n) for n in raw]
    if num_classes is not None and len(names) != num_classes:
        raise error(f"{where} records {len(names)} label_names for a {num_classes}-class head")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise error(f"{where}: label_names repeats {name_list(twice)}; each output needs its own name")
    return names
