"""What ``python -m distill.evaluate`` scores a model on (a recipe, an image folder or the run's
own data) and the table it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import DistillError


def _split_folders(folder: Path) -> list[str]:
    """The validation split folders (val/, test/, validation/) of a root without train/, when
    those are all it holds; empty for a folder of class folders."""
    from distill.data.sources import VAL_SPLIT_NAMES

    subfolders = [p.name for p in folder.iterdir() if p.is_dir()]
    if not subfolders or not set(subfolders) <= set(VAL_SPLIT_NAMES):
        return []
    return [n for n in VAL_SPLIT_NAMES if n in subfolders]


def split_overrides(folder: Path, split: str = "val") -> list[str]:
    """An image folder as imagefolder data (data.sources.folder_overrides), and a root that holds
    only a validation split (``val/``, ``test/`` or ``validation/``, no ``train/``) as that split."""
    from distill.data.sources import folder_overrides

    held = [] if (folder / "train").is_dir() else _split_folders(folder)
    if not held:
        return folder_overrides(folder)
    if split == "train":
        raise DistillError(
            f"{folder} has no train/ folder, only {', '.join(f'{n}/' for n in held)}; evaluate it with --split val"
        )
    root = folder.resolve()
    return ["data.source=imagefolder", f"data.path={root}", f"data.train_split={held[0]}", f"data.val_split={held[0]}"]


def eval_dataset(data: str | None, split: str, fallback: Any) -> tuple[Any, list[str], str]:
    """(HF dataset with image/label columns, its class names, description) from a recipe, a
    folder or the run."""
    from distill.data.shards import MANIFEST, StreamSplit
    from distill.data.sources import load_source
    from distill.recipe.schema import load_recipe

    if data is None:
        if fallback is None:
            raise DistillError("an export has no recipe: pass --data RECIPE.yaml or an image folder")
        cfg = fallback.data
    elif (Path(data) / MANIFEST).is_file():  # a shard set (distill.shard's folder)
        cfg = load_recipe(None, ["data.source=shards", f"data.path={Path(data).resolve()}"]).data
    elif Path(data).is_dir():
        cfg = load_recipe(None, split_overrides(Path(data), split)).data
    elif not Path(data).exists():
        raise DistillError(f"--data {data} does not exist; give a recipe YAML or an image folder")
    else:
        cfg = load_recipe(data).data
    source = load_source(cfg)
    ds = source.val if split == "val" else source.train
    if isinstance(ds, StreamSplit):
        raise ds.not_at_random(f"--split {split}", "pass --data a local or mounted copy of the shard set")
    where = f"{cfg.path}/{cfg.train_split}" if cfg.train_split == cfg.val_split else f"{cfg.path or ''} {split}"
    return ds, source.class_names, f"{cfg.source} {where} ({len(ds)} images)".replace("  ", " ")


def format_table(result: dict[str, Any], title: str) -> str:
    rows = [(k.replace("_", " "), f"{100 * v:.2f}%") for k, v in result.items() if k.startswith("top")]
    classes = f"{result['data_classes']} of the model's {result['model_classes']}"
    rows += [
        ("images", str(result["images"])),
        ("classes", f"{classes}, matched by {result['classes_matched_by']}"),
        ("throughput", f"{result['throughput_img_s'] or 0:.0f} img/s at batch {result['batch_size']}"),
        ("peak memory", f"{result['peak_memory_mb']:.0f} MB ({result['device']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return title + "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
