"""Where a student starts: ``student.init`` resolved to weights, converted to the student's
shape, and recorded.

``student.init`` takes what users have: a run directory (its final student, or
``student.init_checkpoint: last|best|ema``), a checkpoint folder, a timm Hub folder (our export),
or a safetensors / torch file (read with ``weights_only=True``), including a plain ViT. The
position embeddings are resampled to the new patch grid by 2D bicubic interpolation (the ViT
paper's fine-tuning at a higher resolution; DeiT notes that bilinear shrinks the vectors' norm),
the class and distillation rows kept as they are. Heads (``student.init_heads``): kept, or reset
to zero (the ViT paper's zero-initialised D x K head for a new task), or ``auto``: kept when the
class count matches. DeiT's code refuses to fine-tune with distillation
(``NotImplementedError``, DeiT PR #55); here the fine-tune is an ordinary run that starts from
these weights, with or without its teacher.
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class InitSource:
    """The weights a student starts from, and what is known about them."""

    path: Path  # what student.init named
    weights: Path  # the file read
    grid: tuple[int, int] | None  # the source's patch grid, when recorded (else square is assumed)
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


def _run_grid(run: RunDir) -> tuple[int, int]:
    """The patch grid of a run's student, from its recorded recipe (built on the meta device)."""
    recipe = load_recipe(run.recipe_file)
    with torch.device("meta"):
        model = build_student(recipe.student, 2, recipe.distillation.token)
    return tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[return-value]


def _from_run(run: RunDir, which: str, path: Path) -> InitSource:
    summary = run.summary()
    if which == "final":
        if summary is None:
            raise RecipeError(
                f"student.init {path} is a run that has not finished (no summary.json): finish it, or "
                "start from one of its checkpoints with student.init_checkpoint=last or best"
            )
        folder = ckpt.latest_checkpoint(run.checkpoints)
        top1 = summary.final.get("val/top1_fused")
    elif which == "best":
        folder = run.checkpoints / ckpt.BEST if (run.checkpoints / ckpt.BEST / ckpt.MARKER).is_file() else None
        top1 = (summary.best or {}).get("val/top1_fused") if summary is not None else None
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
    return InitSource(path, weights, _run_grid(run), top1, f"run {which}")


def _from_timm_folder(folder: Path) -> InitSource:
    config = json.loads((folder / "config.json").read_text())
    args, cfg = config.get("model_args", {}), config.get("pretrained_cfg", {})
    grid = None
    size, patch = args.get("img_size") or cfg.get("input_size", [None])[-2:], args.get("patch_size")
    if size and patch:
        h, w = (size, size) if isinstance(size, int) else size
        grid = (int(h) // int(patch), int(w) // int(patch))
    return InitSource(folder, folder / "model.safetensors", grid, None, "timm folder")


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
        return InitSource(path, path / name, grid, None, f"checkpoint {path.name}")
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _from_timm_folder(path)
    if path.is_dir():
        raise RecipeError(
            f"student.init {path} is a folder but not a run (recipe.yaml), a checkpoint (progress.json) "
            "or a timm folder (config.json + model.safetensors)"
        )
    return InitSource(path, path, None, None, "file")


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


def _heads(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], mode: str, report: dict[str, list[str]]) -> None:
    """keep | reset (zero, the ViT paper's fine-tuning head) | auto (keep when the shapes match)."""
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
        report["reset"] += keys


def init_student(model: nn.Module, source: InitSource, heads: str = "auto") -> dict[str, list[str]]:
    """Load ``source`` into the student, converting a plain ViT and resampling the position
    embeddings; returns what was converted.

    A plain ViT lacks a distillation token, a position row and a distillation head: they start
    as copies of the class token's, its row and the class head (DeiT's structure implies it).
    """
    from timm.layers import resample_abs_pos_embed

    sd = _read(source)
    own = model.state_dict()
    _check_architecture(source, sd, own)
    report: dict[str, list[str]] = {"added": [], "resampled": [], "reset": []}
    if hasattr(model, "dist_token") and "dist_token" not in sd and "cls_token" in sd:
        sd["dist_token"] = sd["cls_token"].clone()
        pos = sd["pos_embed"]  # (1, 1 + N, D): insert the dist row after the cls row
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        for name in ("weight", "bias"):
            if f"head.{name}" in sd:
                sd[f"head_dist.{name}"] = sd[f"head.{name}"].clone()
        report["added"] += ["dist_token", "pos_embed row 1", "head_dist"]
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = model.num_prefix_tokens
        old = source.grid
        if old is None or old[0] * old[1] != sd["pos_embed"].shape[1] - prefix:
            side = round((sd["pos_embed"].shape[1] - prefix) ** 0.5)
            old = (side, side)  # a bare file records no grid: square, as timm assumes
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=list(old),
            num_prefix_tokens=prefix, interpolation="bicubic", antialias=True,
        )  # fmt: skip
        report["resampled"].append(f"pos_embed {old[0]}x{old[1]} -> {'x'.join(map(str, model.patch_embed.grid_size))}")
    _heads(sd, own, heads, report)
    mismatched = sorted(k for k in own if k in sd and sd[k].shape != own[k].shape)
    missing = sorted(set(own) - set(sd))
    if mismatched or missing:
        raise RecipeError(
            f"student.init {source.path} does not fit student.model: mis-shaped {mismatched[:4]}, missing "
            f"{missing[:4]}; check student.model, embed_dim, depth, num_heads and patch_size against it"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    return report


def initialise(model: nn.Module, cfg: StudentConfig) -> tuple[InitSource, dict[str, list[str]]] | None:
    """The recipe's student.init applied to ``model`` (None when the recipe has none)."""
    if cfg.init is None:
        return None
    source = resolve_init(cfg.init, cfg.init_checkpoint)
    return source, init_student(model, source, cfg.init_heads)
