"""Path -> loaded model with its input spec and class names: a run directory, a checkpoint folder
or an export in any format ``distill.export`` writes (timm folder, transformers folder, ONNX fp32
or int8, TorchScript; each format's module reloads it as a module giving its logits).
``evaluate`` and ``export`` (and later analyses) load models here and nowhere else, and ``score``
measures a loaded model on a split with its own eval preprocessing, matching the split's classes
to the model's outputs by name.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data.pipeline import eval_loader
from distill.errors import DataError, DistillError
from distill.models.labels import name_list, read_label_names
from distill.models.spec import InputSpec
from distill.models.student import student_input_spec
from distill.recipe.schema import Recipe, load_recipe
from distill.run import checkpoint as ckpt
from distill.run.rundir import RunDir


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on the CPU
    spec: InputSpec  # what it expects: size, normalisation, eval crop, interpolation
    description: str
    recipe: Recipe | None = None  # the run's recipe, when the model comes from a run
    run_dir: Path | None = None
    checkpoint: Path | None = None
    progress: dict[str, Any] | None = None  # the checkpoint's progress.json
    class_names: list[str] | None = None  # output i is class class_names[i]; None: not recorded

    def logged_row(self) -> dict[str, Any] | None:
        """The evaluation the run logged at this checkpoint's step, if it evaluated there."""
        if self.run_dir is None or self.progress is None:
            return None
        return RunDir(self.run_dir).logged_at(self.progress["epoch"], self.progress["global_step"])


def run_class_names(run_dir: Path, recipe: Recipe, num_classes: int) -> list[str] | None:
    """The classes a run trained on, in output order: what the run recorded (summary.json, its
    export's config.json), else its data's, which means loading the split (slow for big folders);
    None when nothing recorded them and the data cannot be loaded any more."""
    rundir = RunDir(run_dir)
    recorded = (rundir.summary().get("data") or {}).get("class_names")
    if not recorded and (rundir.export_dir / "config.json").is_file():
        recorded = json.loads((rundir.export_dir / "config.json").read_text()).get("label_names")
    if recorded:
        names = read_label_names(recorded, num_classes, f"run {run_dir}")
        assert names is not None
        return names
    from distill.data.sources import load_source

    try:
        names = load_source(recipe.data).class_names
    except DataError:  # the run's data is gone: names unknown, classes match by index (with equal counts)
        return None
    if len(names) != num_classes:
        raise DistillError(
            f"run {run_dir}: its data ({recipe.data.source} {recipe.data.path or ''}) now has {len(names)} "
            f"classes but the checkpoint's head has {num_classes}; the data changed since training"
        )
    return list(names)


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``last``, ``best`` or a checkpoint folder of ``run_dir``; a complete one or an error."""
    root = RunDir(run_dir).checkpoints
    if which == "last":
        found = ckpt.latest_checkpoint(root)
        if found is None:
            raise DistillError(f"{run_dir} has no complete checkpoint in {root}")
        return found
    if which == "best":
        if not (root / ckpt.BEST / ckpt.MARKER).is_file():
            raise DistillError(f"{run_dir} has no complete best checkpoint ({root / ckpt.BEST})")
        return root / ckpt.BEST
    path = Path(which)
    if not (path / ckpt.MARKER).is_file():
        raise DistillError(f"{path} is not a complete checkpoint (no {ckpt.MARKER}); use last, best or a step_* folder")
    return path


def load_checkpoint_student(run_dir: Path, checkpoint: Path, ema: bool = False) -> LoadedModel:
    """The student of ``checkpoint`` (or its EMA), rebuilt from the run's recorded recipe."""
    from safetensors.torch import load_file

    from distill.models.student import build_student

    recipe = load_recipe(RunDir(run_dir).recipe_file)
    weights = checkpoint / (ckpt.EMA_FILE if ema else "model.safetensors")
    if not weights.is_file():
        hint = " (the run had no EMA: train.ema_decay was null)" if ema else ""
        raise DistillError(f"{weights} does not exist{hint}")
    state = load_file(str(weights))
    if ema:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = int(state["head.weight"].shape[0])
    model = build_student(recipe.student, num_classes, recipe.distillation.token)
    model.load_state_dict(state)
    spec = student_input_spec(recipe)
    model.pretrained_cfg = {**model.pretrained_cfg, **spec.timm_config()}
    progress = json.loads((checkpoint / ckpt.MARKER).read_text())
    what = f"{checkpoint}{' (EMA)' if ema else ''}, epoch {progress['epoch']}, step {progress['global_step']}"
    names = run_class_names(run_dir, recipe, num_classes)
    return LoadedModel(model.eval(), spec, what, recipe, run_dir, checkpoint, progress, names)


def load_export(folder: Path) -> LoadedModel:
    """A timm Hub folder (our export), through timm alone."""
    from timm.data import resolve_model_data_config

    from distill.exports.timm_format import folder_head, load_timm, timm_folder_config

    model = load_timm(folder)
    head = folder_head(timm_folder_config(folder) or {})
    if head != "fused":  # an export of one head: its other head is zeros, not a head (select_head)
        model.output_heads = (head,)
    spec = InputSpec.from_timm(resolve_model_data_config(model))
    # timm moves config.json's root-level label_names (save_for_hf writes them there) into pretrained_cfg.
    names = read_label_names(model.pretrained_cfg.get("label_names"), model.num_classes, f"export {folder}")
    what = f"export {folder} ({model.pretrained_cfg.get('architecture')})"
    return LoadedModel(model, spec, what, class_names=names)


def load_exported_file(path: Path) -> LoadedModel:
    """An ONNX (fp32 or int8) or TorchScript file of an export folder, with that folder's
    preprocessing and class names (the file records neither)."""
    from distill.exports.onnx_format import OnnxClassifier
    from distill.exports.timm_format import folder_info
    from distill.exports.torchscript_format import TorchScriptClassifier

    kind = "ONNX" if path.suffix == ".onnx" else "TorchScript"
    info = folder_info(path.parent, f"{kind} file {path.name}")
    model = OnnxClassifier(path, info.num_classes) if kind == "ONNX" else TorchScriptClassifier(path, info.num_classes)
    model.output_heads = (info.head,)
    names = read_label_names(info.class_names, info.num_classes, f"export {path.parent}")
    return LoadedModel(model, info.spec, f"{kind} {path}", class_names=names)


def load_transformers_folder(folder: Path) -> LoadedModel:
    """transformers' DeiT/ViT folder (``--format transformers``) with the preprocessing of its
    own preprocessor_config.json and the class names of its id2label."""
    from distill.exports.transformers_format import TransformersClassifier, spec_from_image_processor

    processor = folder / "preprocessor_config.json"
    if not processor.is_file():
        raise DistillError(f"{folder} is a transformers model folder without preprocessor_config.json")
    spec = spec_from_image_processor(json.loads(processor.read_text()), str(processor))
    model = TransformersClassifier(folder)
    id2label = model.hf.config.id2label
    names = read_label_names({int(k): v for k, v in id2label.items()}, model.num_classes, f"export {folder}")
    what = f"transformers {folder} ({type(model.hf).__name__})"
    return LoadedModel(model, spec, what, class_names=names)


ACCEPTED = (
    "a run directory, a checkpoint, or an export: a timm folder (config.json with architecture and "
    "pretrained_cfg), its transformers/ folder (DeiT or ViT), or a .onnx or TorchScript .pt file in it"
)
TRANSFORMERS_TYPES = ("deit", "vit")  # what --format transformers writes


def _foreign_folder(config: dict[str, Any]) -> str:
    """What a config.json that distill cannot evaluate belongs to, for the error message."""
    if "_diffusers_version" in config or "_class_name" in config:
        return f"a diffusers folder ({config.get('_class_name', 'unknown class')})"
    if "model_type" in config or "architectures" in config:
        arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
        return f"a transformers '{config.get('model_type', '?')}' folder ({arch})"
    return f"a folder whose config.json is neither timm's nor transformers' (keys: {', '.join(sorted(config)[:8])})"


def load_artifact(path: Path, checkpoint: str = "last", ema: bool = False) -> LoadedModel:
    """A run directory (its ``checkpoint``: last, best or a folder), a checkpoint folder, or an
    export in any format ``distill.export`` writes."""
    path = Path(path)
    if not path.exists():
        raise DistillError(f"{path} does not exist; give {ACCEPTED}")
    if RunDir(path).recipe_file.is_file():
        return load_checkpoint_student(path, resolve_checkpoint(path, checkpoint), ema)
    if (path / ckpt.MARKER).is_file() and RunDir(path.parent.parent).recipe_file.is_file():
        return load_checkpoint_student(path.parent.parent, path, ema)
    if path.is_file() and path.suffix in (".onnx", ".pt"):
        return load_exported_file(path)
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise DistillError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
        if "architecture" in config and "pretrained_cfg" in config:
            return load_export(path)
        if config.get("model_type") in TRANSFORMERS_TYPES:
            return load_transformers_folder(path)
        raise DistillError(f"{path} is {_foreign_folder(config)}, not a distill export; evaluate reads {ACCEPTED}")
    raise DistillError(f"{path} is not something distill can evaluate; give {ACCEPTED}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dataset_class_names(dataset: Any) -> list[str] | None:
    """The names of a datasets.Dataset's ClassLabel ``label`` column, if it has one."""
    feature = getattr(dataset, "features", {}).get("label")
    names = getattr(feature, "names", None)
    return list(names) if names else None


def match_classes(
    data_names: list[str] | None, model_names: list[str] | None, num_outputs: int | None, model: str
) -> torch.Tensor | None:
    """The model's output index for each data label (by name), or None where labels already are
    output indices. A data class the model does not know is an error, not a silent 0%: matched by
    index, a folder of 7/ 8/ 9/ scores an export of digits 0-9 against digits 0-2 (0.33%)."""
    if data_names is None:
        return None
    if model_names is None:
        if num_outputs is not None and num_outputs != len(data_names):
            raise DataError(
                f"{model} records no class names and has {num_outputs} outputs, but the data has "
                f"{len(data_names)} classes ({name_list(data_names)}); without names classes are matched "
                "by index, which needs equal counts. Evaluate on data with all of the model's classes"
            )
        return None
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise DataError(
            f"the data has {len(unknown)} class(es) that {model} does not know: {name_list(unknown)}; "
            f"the model's classes are {name_list(model_names)}. Class folders must be named after the "
            "model's classes (a subset of them is fine)"
        )
    index = {n: i for i, n in enumerate(model_names)}
    return torch.tensor([index[n] for n in data_names], dtype=torch.long)


@torch.no_grad()
def score(
    loaded: LoadedModel,
    dataset: Any,
    batch_size: int,
    device: torch.device | None = None,
    num_workers: int = 0,
    class_names: list[str] | None = None,
    predictions: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 per head over ``dataset`` with the model's own eval preprocessing.

    ``class_names`` (default: the dataset's ClassLabel names) name its labels; each is scored as
    the model's output of that name, so a subset of the model's classes scores correctly. Top-k
    is over all of the model's outputs: predicting a class absent from the data is still wrong.
    A timm student has the cls, dist and fused heads; an exported format those it keeps
    (``output_heads``, given by ``forward_heads``), else its one fused output. ``predictions``
    adds each head's argmax per image (``result["predictions"][head]``, a tensor). ``progress`` is
    called after every batch with the images scored so far and the total.
    """
    from distill.models.metrics import topk_correct
    from distill.models.student import student_heads

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_names = class_names if class_names is not None else dataset_class_names(dataset)
    num_outputs = getattr(loaded.model, "num_classes", None)
    targets = match_classes(data_names, loaded.class_names, num_outputs, loaded.description)
    if targets is not None:
        targets = targets.to(device)
    model = loaded.model.to(device).eval()
    loader = eval_loader(dataset, loaded.spec, batch_size, num_workers)
    heads = _output_heads(model)
    sums = {f"top{k}_{h}": 0.0 for h in heads for k in (1, 5)}
    argmax: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    n, compute = 0, 0.0
    for i, batch in enumerate(loader):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if targets is not None:
            labels = targets[labels]
        start = time.perf_counter()
        if hasattr(model, "forward_heads"):
            logits = model.forward_heads(images)
        elif len(heads) == 3:
            cls, dist = student_heads(model, images)
            logits = {"cls": cls, "dist": dist, "fused": (cls + dist) / 2}
        else:  # one output: the fused logits, or the one head an export kept
            logits = {heads[0]: model(images)}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0 or len(loader) == 1:  # the first batch warms up (allocations, kernels)
            compute += time.perf_counter() - start
        for h, out in logits.items():
            for k in (1, 5):
                sums[f"top{k}_{h}"] += float(topk_correct(out.float(), labels, k).sum())
            if predictions:
                argmax[h].append(out.argmax(-1).cpu())
        n += labels.shape[0]
        if progress is not None:
            progress(n, len(dataset))
    timed = n - (0 if len(loader) == 1 else min(batch_size, n))
    return {
        **{k: v / n for k, v in sums.items()},
        "images": n,
        "throughput_img_s": timed / compute if compute else None,
        "batch_size": batch_size,
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "data_classes": len(data_names) if data_names is not None else None,
        "model_classes": num_outputs,
        "classes_matched_by": "name" if targets is not None else "index",
        **({"predictions": {h: torch.cat(p) for h, p in argmax.items()}} if predictions else {}),
    }


def _output_heads(model: nn.Module) -> tuple[str, ...]:
    """The heads ``score`` reports: an exported format's own list, else a timm student's."""
    if hasattr(model, "output_heads"):
        return tuple(model.output_heads)
    return ("cls", "dist", "fused") if hasattr(model, "head_dist") else ("fused",)
