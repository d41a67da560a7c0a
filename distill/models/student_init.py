"""Where a student starts: ``student.init`` resolved to weights, converted to the student's
shape, and recorded.

``student.init`` takes what users have: a run directory (its final student, or
``student.init_checkpoint: last|best|ema``), a checkpoint folder, a timm Hub folder (our export),
or a safetensors / torch file (read with ``weights_only=True``), distilled or plain ViT: a plain
source gets the distillation parts a distilled student has, a distilled source loses them for a
plain student (``distillation.token=false``). The position embeddings are resampled whenever the
source's patch grid differs from the student's, by 2D bicubic interpolation (the ViT paper's
fine-tuning at a higher resolution; DeiT notes that bilinear shrinks the vectors' norm), the class
and distillation rows kept as they are. The source's grid is what its run's recipe builds, else its
recorded input size over its patch-embedding kernel; only a bare weights file (which records no
input size) is assumed square, and the init line says so. A source with parameters the student
lacks is refused rather than loaded without them. Heads (``student.init_heads``): kept, or reset
to zero (the ViT paper's zero-initialised D x K head for a new task), or ``auto``: kept when the
class count matches. DeiT's code refuses to fine-tune with distillation
(``NotImplementedError``, DeiT PR #55); here the fine-tune is an ordinary run that starts from
these weights, with or without its teacher.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import RecipeError, TeacherError
from distill.models.student import build_student, file_sha256, read_state_dict
from distill.recipe.schema import StudentConfig, load_recipe
from distill.run import checkpoint as ckpt
from distill.run.rundir import RunDir

# What a distilled ViT has and a plain one lacks (timm's VisionTransformerDistilled).
DISTILLATION_PARTS = frozenset({"dist_token", "head_dist.weight", "head_dist.bias"})


@dataclass(frozen=True)
class InitSource:
    """The weights a student starts from, and what is known about them."""

    path: Path  # what student.init named
    weights: Path  # the file read
    grid: tuple[int, int] | None  # the source's patch grid, when its run's recipe fixes it
    img_size: tuple[int, int] | None  # the source's input size, when an export records it
    recorded_top1: float | None  # what the source scored (its run's logged fused top-1)
    what: str  # e.g. "run final", "checkpoint best", "timm folder", "file"

    def describe(self) -> dict[str, Any]:
        """summary.json, the model card and the report."""
        return {
            "path": str(self.path),
            "weights": str(self.weights),
            "sha256": file_sha256(self.weights),
            "source": self.what,
            "recorded_top1": self.recorded_top1,
        }


@dataclass(frozen=True)
class Conversion:
    """What ``init_student`` changed on the way from the source's weights to the student's."""

    added: tuple[str, ...] = ()  # parts the source lacks (a plain ViT's distillation token)
    dropped: tuple[str, ...] = ()  # the source's distillation parts a plain student has no use for
    resampled: tuple[str, ...] = ()  # e.g. "pos_embed 7x7 -> 14x14"
    reset: tuple[str, ...] = ()  # heads set to zero (student.init_heads)

    def as_dict(self) -> dict[str, list[str]]:
        """summary.json's ``student_init.converted``."""
        return {k: list(v) for k, v in vars(self).items()}

    def words(self) -> str:
        """One clause per change, e.g. 'position embeddings resampled 7x7 -> 14x14'."""
        parts = []
        if self.added:
            parts.append("added a distillation token, its position row and head (copies of the class token's)")
        if self.dropped:
            parts.append("dropped the source's distillation token, its position row and head (a plain student)")
        parts += [f"position embeddings resampled {r.removeprefix('pos_embed ')} (bicubic)" for r in self.resampled]
        if self.reset:
            parts.append("heads reset to zero")
        return "; ".join(parts) or "loaded as they are"


@dataclass(frozen=True)
class StudentInit:
    """``initialise``'s result: where the weights came from and what was converted."""

    source: InitSource
    conversion: Conversion

    def line(self) -> str:
        """The run's console line."""
        return f"student: initialised from {self.source.path} ({self.source.what}): {self.conversion.words()}"

    def describe(self) -> dict[str, Any]:
        """summary.json's ``student_init``."""
        return {**self.source.describe(), "converted": self.conversion.as_dict()}


def _run_grid(run: RunDir) -> tuple[int, int]:
    """The patch grid of a run's student, from its recorded recipe (built on the meta device)."""
    recipe = load_recipe(run.recipe_file)
    with torch.device("meta"):
        model = build_student(recipe.student, 2, recipe.distillation.token)
    return tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[return-value]


def _from_run(run: RunDir, which: str, path: Path) -> InitSource:
    summary = run.summary()
    if which == "final":
        if not summary:
            raise RecipeError(
                f"student.init {path} is a run that has not finished (no summary.json): finish it, or "
                "start from one of its checkpoints with student.init_checkpoint=last or best"
            )
        folder = ckpt.latest_checkpoint(run.checkpoints)
        top1 = summary.get("final", {}).get("val/top1_fused")
    elif which == "best":
        folder = run.checkpoints / ckpt.BEST if (run.checkpoints / ckpt.BEST / ckpt.MARKER).is_file() else None
        top1 = summary.get("best", {}).get("val/top1_fused")
    else:  # last, ema
        folder = ckpt.latest_checkpoint(run.checkpoints)
        top1 = None
    if folder is None:
        raise RecipeError(f"student.init {path} has no complete {which} checkpoint in {run.checkpoints}")
    progress = json.loads((folder / ckpt.MARKER).read_text())
    row = run.logged_at(progress["epoch"], progress["global_step"]) or {}
    if which in ("last", "ema"):
        top1 = row.get("val_ema/top1_fused" if which == "ema" else "val/top1_fused")
    weights = folder / (ckpt.EMA_FILE if which == "ema" else "model.safetensors")
    if not weights.is_file():
        hint = " (the run had no EMA: train.ema_decay was null)" if which == "ema" else ""
        raise RecipeError(f"student.init {path}: {weights} does not exist{hint}")
    return InitSource(path, weights, _run_grid(run), None, top1, f"run {which}")


def _from_timm_folder(folder: Path) -> InitSource:
    """An export folder records its input size (``pretrained_cfg.input_size``, which build_student
    makes the truth, or ``model_args.img_size``); the patch size is read from the weights."""
    config = json.loads((folder / "config.json").read_text())
    args, cfg = config.get("model_args", {}), config.get("pretrained_cfg", {})
    size = args.get("img_size") or cfg.get("input_size", [None])[-2:]
    img_size = None
    if isinstance(size, int):
        img_size = (size, size)
    elif size and all(isinstance(v, int) for v in size):
        img_size = (int(size[0]), int(size[1]))
    return InitSource(folder, folder / "model.safetensors", None, img_size, None, "timm folder")


def resolve_init(path: Path, which: str = "final") -> InitSource:
    """``student.init`` (with ``student.init_checkpoint``) -> the weights file and its provenance."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RecipeError(
            f"student.init {path} does not exist; give a run directory, a checkpoint folder, an export "
            "folder or a weights file"
        )
    if path.is_dir() and RunDir(path).recipe_file.is_file():
        return _from_run(RunDir(path), which, path)
    if path.is_dir() and (path / ckpt.MARKER).is_file():
        run = RunDir(path.parent.parent)
        grid = _run_grid(run) if run.recipe_file.is_file() else None
        name = ckpt.EMA_FILE if which == "ema" else "model.safetensors"
        return InitSource(path, path / name, grid, None, None, f"checkpoint {path.name}")
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _from_timm_folder(path)
    if path.is_dir():
        raise RecipeError(
            f"student.init {path} is a folder but not a run (recipe.yaml), a checkpoint (progress.json) "
            "or a timm folder (config.json + model.safetensors)"
        )
    return InitSource(path, path, None, None, None, "file")


def _read(source: InitSource) -> dict[str, torch.Tensor]:
    try:
        sd = read_state_dict(source.weights)
    except TeacherError as exc:
        raise RecipeError(str(exc).replace("teacher checkpoint", "student.init")) from None
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _sizes(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    proj = sd.get("patch_embed.proj.weight")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    return {
        "embed_dim": None if proj is None else int(proj.shape[0]),
        "depth": len(blocks),
        "patch_size": None if proj is None else tuple(int(v) for v in proj.shape[-2:]),
    }


def _check_architecture(source: InitSource, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    theirs, ours = _sizes(sd), _sizes(own)
    differ = [k for k in ours if theirs[k] != ours[k]]
    if differ:
        sizes = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in differ)
        raise RecipeError(
            f"student.init {source.path} does not fit the student: checkpoint vs student {sizes}; set "
            f"student.{'/'.join(differ)} to the checkpoint's (a fine-tune keeps width, depth and patch size)"
        )


def _heads(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], mode: str) -> list[str]:
    """keep | reset (zero, the ViT paper's fine-tuning head) | auto (keep when the shapes match);
    returns the heads reset."""
    keys = [k for k in own if k.startswith(("head.", "head_dist."))]
    fits = all(k in sd and sd[k].shape == own[k].shape for k in keys)
    if mode == "keep" and not fits:
        shapes = {k: tuple(sd[k].shape) if k in sd else None for k in keys if k.endswith("weight")}
        raise RecipeError(
            f"student.init_heads=keep, but the checkpoint's heads {shapes} do not fit the data's "
            f"{own['head.weight'].shape[0]} classes; use student.init_heads=reset (or auto)"
        )
    if mode == "reset" or (mode == "auto" and not fits):
        for k in keys:
            sd[k] = torch.zeros_like(own[k])
        return keys
    return []


def _refuse_extras(source: InitSource, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """A source with parameters the student lacks (layer scale, q/k norms, norm_pre, register
    tokens: another ViT variant of the same size) would lose them in silence; only the
    distillation parts may be left behind, and ``_convert_token`` says so when it drops them."""
    extras = sorted(k for k in sd if k not in own and k not in DISTILLATION_PARTS)
    if extras:
        shown = ", ".join(extras[:6]) + (f" and {len(extras) - 6} more" if len(extras) > 6 else "")
        raise RecipeError(
            f"student.init {source.path} has parameters the student lacks ({shown}): they would be "
            "dropped and the model would compute something else; start from a checkpoint of the same "
            "ViT variant as student.model, or choose a student.model that has them"
        )


def _source_grid(source: InitSource, sd: dict[str, torch.Tensor]) -> tuple[tuple[int, int], str]:
    """The source's patch grid and how it is known: from its run's recipe, else from its
    recorded input size over the patch-embedding kernel, else (a bare file or a hybrid export)
    assumed square from the number of position rows, as timm assumes, and said so."""
    rows = sd["pos_embed"].shape[1] - 1 - ("dist_token" in sd)
    grid, how = source.grid, ""
    proj = sd.get("patch_embed.proj.weight")
    hybrid = any(k.startswith("patch_embed.backbone.") for k in sd)
    if grid is None and source.img_size is not None and proj is not None and not hybrid:
        (h, w), (ph, pw) = source.img_size, proj.shape[-2:]
        grid = (h // ph, w // pw)
    if grid is None:
        side = math.isqrt(rows)
        if side * side != rows:
            raise RecipeError(
                f"student.init {source.path} records no input size and its {rows} position rows are "
                "not a square grid; start from its run directory, checkpoint or export folder, which "
                "record it"
            )
        grid, how = (side, side), f" (assumed square: {source.what} records no input size)"
    if grid[0] * grid[1] != rows:
        raise RecipeError(
            f"student.init {source.path}: its recorded {grid[0]}x{grid[1]} patch grid does not match its "
            f"{rows} position rows; the weights are not those of the recipe or config beside them"
        )
    return (int(grid[0]), int(grid[1])), how


def _convert_token(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Give a plain source the distillation parts a distilled student has, or take a distilled
    source's away for a plain one; returns (added, dropped).

    Added parts start as copies of the class token, its position row and the class head. That
    is this project's choice: DeiT and timm initialise a new distillation token with
    trunc_normal(std=0.02) (and timm's head_dist from scratch); a copy starts both heads from the
    source's accuracy. With distillation.type=none both heads learn the same labels from
    identical tokens and rows, so the copies stay identical through training.
    """
    if hasattr(model, "dist_token") and "dist_token" not in sd and "cls_token" in sd:
        sd["dist_token"] = sd["cls_token"].clone()
        pos = sd["pos_embed"]  # (1, 1 + N, D): insert the dist row after the cls row
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        for name in ("weight", "bias"):
            if f"head.{name}" in sd:
                sd[f"head_dist.{name}"] = sd[f"head.{name}"].clone()
        return ["dist_token", "pos_embed row 1", "head_dist"], []
    if not hasattr(model, "dist_token") and "dist_token" in sd:
        del sd["dist_token"]
        sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1)
        for name in ("weight", "bias"):
            sd.pop(f"head_dist.{name}", None)
        return [], ["dist_token", "pos_embed row 1", "head_dist"]
    return [], []


def convert(model: nn.Module, source: InitSource, heads: str = "auto") -> tuple[dict[str, torch.Tensor], Conversion]:
    """The source's weights in the student's shape (checked against ``model``'s state dict, which
    may live on the meta device), and what was converted."""
    from timm.layers import resample_abs_pos_embed

    sd = _read(source)
    own = model.state_dict()
    _check_architecture(source, sd, own)
    _refuse_extras(source, sd, own)
    grid, how = _source_grid(source, sd) if "pos_embed" in sd else (None, "")
    added, dropped = _convert_token(model, sd)
    resampled = []
    new = tuple(int(g) for g in model.patch_embed.grid_size)
    if grid is not None and grid != new:  # grids, not shapes: 2x8 and 4x4 hold as many rows
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=list(new), old_size=list(grid),
            num_prefix_tokens=model.num_prefix_tokens, interpolation="bicubic", antialias=True,
        )  # fmt: skip
        resampled.append(f"pos_embed {grid[0]}x{grid[1]} -> {new[0]}x{new[1]}{how}")
    reset = _heads(sd, own, heads)
    mismatched = sorted(k for k in own if k in sd and sd[k].shape != own[k].shape)
    missing = sorted(set(own) - set(sd))
    if mismatched or missing:
        raise RecipeError(
            f"student.init {source.path} does not fit student.model: mis-shaped {mismatched[:4]}, missing "
            f"{missing[:4]}; check student.model, embed_dim, depth, num_heads and patch_size against it"
        )
    conversion = Conversion(tuple(added), tuple(dropped), tuple(resampled), tuple(reset))
    return {k: v for k, v in sd.items() if k in own}, conversion


def init_student(model: nn.Module, source: InitSource, heads: str = "auto") -> Conversion:
    """Load ``source`` into the student: a plain ViT's weights into a distilled student or the
    reverse, the position embeddings resampled to the student's patch grid."""
    sd, conversion = convert(model, source, heads)
    model.load_state_dict(sd, strict=True)
    return conversion


def check_init(cfg: StudentConfig, num_classes: int, token: bool) -> None:
    """Everything ``initialise`` would refuse, against the student built on the meta device (no
    memory, no RNG draws): run before a teacher is trained for a student that cannot start."""
    if cfg.init is None:
        return
    with torch.device("meta"):
        model = build_student(cfg, num_classes, token)
    convert(model, resolve_init(cfg.init, cfg.init_checkpoint), cfg.init_heads)


def initialise(model: nn.Module, cfg: StudentConfig) -> StudentInit | None:
    """The recipe's student.init applied to ``model`` (None when the recipe has none)."""
    if cfg.init is None:
        return None
    source = resolve_init(cfg.init, cfg.init_checkpoint)
    return StudentInit(source, init_student(model, source, cfg.init_heads))
