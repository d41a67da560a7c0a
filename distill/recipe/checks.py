"""Settings a recipe makes that cannot change its run: refused or reported before the run starts.

A key set to a value other than its default where the recipe cannot read it (``keys.INERT``:
data.path with data.source=digits, distillation.tau without soft distillation, teacher.train
with a teacher checkpoint, ...) is refused when it misleads about what the run trains on, else
reported in one warning line; and a schedule that never leaves its warm-up is reported. The
trainer prints the lines and keeps them with the run's record.
"""

from __future__ import annotations

from distill.errors import RecipeError
from distill.recipe.keys import INERT, covered, field_defaults, get_path, optional_section
from distill.recipe.schema import OptimConfig, Recipe


def warmup_warning(cfg: OptimConfig, where: str) -> str | None:
    """The warning for a schedule that never leaves its warm-up (``where``: train or
    teacher.train), None when the run gets past it."""
    if cfg.warmup_epochs <= 0 or cfg.epochs > cfg.warmup_epochs:
        return None
    share = cfg.epochs / cfg.warmup_epochs
    return (
        f"{where}.epochs={cfg.epochs} is not above {where}.warmup_epochs={cfg.warmup_epochs:g}: the learning "
        f"rate rises for the whole run, ends at about {share:.0%} of its peak and never decays; raise "
        f"{where}.epochs or lower {where}.warmup_epochs"
    )


def check_settings(recipe: Recipe) -> list[str]:
    """Refuse a recipe that sets a key it cannot read where that misleads (``Inert.error``);
    return one warning line for each other key set to no effect, and for a schedule that never
    leaves its warm-up (``warmup_warning``). The trainer prints and records them."""
    tree = recipe.model_dump(mode="json")
    warnings: list[str] = []
    for rule, inert in INERT.items():
        reason = inert.why(tree)
        if reason is None:
            continue
        if optional_section(rule):
            named = rule if get_path(tree, rule) is not None else ""
        else:
            changed = [p for p in covered(rule) if get_path(tree, p) != field_defaults()[p]]
            named = ", ".join(f"{p}={get_path(tree, p)}" for p in changed)
        if not named:
            continue
        if inert.error:
            raise RecipeError(f"{named} has no effect: {reason}; {inert.fix}")
        warnings.append(f"{named} has no effect: {reason}")
    stages = [(recipe.train, "train")]
    if recipe.teacher.train is not None and recipe.teacher.checkpoint is None:  # a teacher trained here
        stages.append((recipe.teacher.train, "teacher.train"))
    return warnings + [w for cfg, where in stages if (w := warmup_warning(cfg, where))]
