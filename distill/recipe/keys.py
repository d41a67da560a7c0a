"""Which recipe fields change what: one table, read by every cache and by resume.

Four effects, each the answer to one question a cache or a resumed run asks about a field:

- ``SPLIT``: which images are in train and val (``data.load_source`` keeps splits by these).
- ``TEACHER``: the weights of a teacher the pipeline trains (the trained-teacher cache key).
- ``TEACHER_OUTPUTS``: the teacher's logits at a given place in the data stream (the
  teacher-output cache key): the teacher itself, the tensor it is fed there, and how it runs.
- ``RESULT``: what a resumed run ends with (a resume refuses a recipe that differs in one).

They nest: a field that changes the split changes a trained teacher; one that changes a trained
teacher changes its outputs; one that changes the outputs changes the result (tests/test_keys.py
checks it). A field with no effect at all is an operational setting a resumed run may change.

The table is keyed by the schema's leaf fields (recipe.schema.Recipe), free-form dict fields
(``teacher.model_args``) as a whole; a new recipe field is classified here in the same commit
(tests/test_keys.py fails until it is). Keys of the data's identity that are not recipe fields
(the package version, world size, the resolved data path, the teacher's weight digest) are for
each cache to add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

from pydantic import BaseModel

from distill.recipe.overrides import section_model
from distill.recipe.schema import PROVENANCE_KEY, DataConfig, Recipe


class Effect(str, Enum):
    SPLIT = "split"
    TEACHER = "teacher"
    TEACHER_OUTPUTS = "teacher_outputs"
    RESULT = "result"


SPLIT, TEACHER, TEACHER_OUTPUTS, RESULT = Effect.SPLIT, Effect.TEACHER, Effect.TEACHER_OUTPUTS, Effect.RESULT

# The nested combinations the table is made of.
IN_SPLIT = frozenset({SPLIT, TEACHER, TEACHER_OUTPUTS, RESULT})
IN_TEACHER = frozenset({TEACHER, TEACHER_OUTPUTS, RESULT})
IN_OUTPUTS = frozenset({TEACHER_OUTPUTS, RESULT})
RESULT_ONLY = frozenset({RESULT})
NO_EFFECT: frozenset[Effect] = frozenset()
# A key this version does not know (an older recipe's): assume it mattered.
UNKNOWN = frozenset(Effect)

TABLE: dict[str, frozenset[Effect]] = {
    # -- run ------------------------------------------------------------------------------------
    "run.name": RESULT_ONLY,  # where the run lives (part of the resume check)
    "run.output_dir": RESULT_ONLY,  # likewise (the caches under it are found by key, not by place)
    # The data stream's seed when data.seed is None (pipeline.data_seed); the teacher stage seeds
    # from teacher.train.seed, so a trained teacher does not depend on it.
    "run.seed": IN_OUTPUTS,
    "run.resume": NO_EFFECT,  # whether to continue, not what the continuation computes
    "run.overwrite": NO_EFFECT,  # likewise
    "run.checkpoint_every_steps": NO_EFFECT,  # a mid-epoch resume reproduces the uninterrupted run
    "run.progress_every_s": NO_EFFECT,  # how often a progress line is printed
    "run.keep_checkpoints": NO_EFFECT,  # how many files stay on disk
    "run.log_every_steps": NO_EFFECT,  # TensorBoard scalars and the finite-loss check only
    "run.trackers": NO_EFFECT,  # where the same scalars are sent
    "run.export": NO_EFFECT,  # written after training, from the same weights
    "run.teacher_only": RESULT_ONLY,  # stops before the student: another result altogether
    "run.process_group_timeout_min": NO_EFFECT,  # how long processes wait for each other
    # -- data: which images (data.load_source) ---------------------------------------------------
    "data.source": IN_SPLIT,
    "data.path": IN_SPLIT,
    "data.hub_config": IN_SPLIT,
    "data.train_split": IN_SPLIT,
    "data.val_split": IN_SPLIT,
    "data.val_fraction": IN_SPLIT,
    "data.split_seed": IN_SPLIT,
    "data.max_train_samples": IN_SPLIT,
    "data.max_val_samples": IN_SPLIT,
    "data.on_bad_image": IN_SPLIT,  # 'skip' drops the unreadable images from the split
    "data.verify_shards": NO_EFFECT,  # a check: the split is the same, or the load stops
    # Another order of the same images (and the teacher stage's too); the split is the same.
    "data.shard_access": IN_TEACHER,
    "data.stream_buffer": IN_TEACHER,  # the in-shard order of stream mode
    "data.synthetic.num_classes": IN_SPLIT,
    "data.synthetic.train_per_class": IN_SPLIT,
    "data.synthetic.val_per_class": IN_SPLIT,
    "data.synthetic.image_size": IN_SPLIT,
    "data.synthetic.noise": IN_SPLIT,
    # -- data: how they are read ---------------------------------------------------------------
    # A view is a function of (seed, epoch, index), not of the worker; in stream mode the order
    # depends on the workers too, which ``stream_layout`` adds where it matters.
    "data.num_workers": NO_EFFECT,
    # The student's data stream (order, views, mixup); the teacher stage draws its own from
    # teacher.train.seed, so a trained teacher does not depend on it.
    "data.seed": IN_OUTPUTS,
    "data.repeated_aug": IN_TEACHER,  # which views the stream holds (the teacher stage's too)
    "data.store": IN_TEACHER,  # the tensor path's views differ from PIL's; both stages use it
    # Augmentation: the teacher stage trains on the student's pipeline, and the teacher's outputs
    # are computed on the augmented (and mixed) batch the student sees.
    "data.augment.scale": IN_TEACHER,
    "data.augment.ratio": IN_TEACHER,
    "data.augment.hflip": IN_TEACHER,
    "data.augment.color_jitter": IN_TEACHER,
    "data.augment.auto_augment": IN_TEACHER,
    "data.augment.re_prob": IN_TEACHER,
    "data.augment.mixup": IN_TEACHER,
    "data.augment.cutmix": IN_TEACHER,
    "data.augment.mixup_prob": IN_TEACHER,
    "data.augment.mixup_switch_prob": IN_TEACHER,
    "data.augment.crop_pct": IN_TEACHER,  # part of the input spec (pipeline.student_input_spec)
    "data.augment.interpolation": IN_TEACHER,  # likewise
    # -- teacher ---------------------------------------------------------------------------------
    "teacher.model": IN_TEACHER,
    "teacher.img_size": IN_TEACHER,  # the size it is trained at and fed
    "teacher.model_args": IN_TEACHER,  # the whole free-form dict
    # Another teacher's weights; a trained teacher is only used when this is None.
    "teacher.checkpoint": IN_OUTPUTS,
    # Re-normalisation of the student's input at inference (FrozenTeacher); the teacher stage
    # trains on the student's normalisation and ignores them.
    "teacher.mean": IN_OUTPUTS,
    "teacher.std": IN_OUTPUTS,
    "teacher.min_top1": RESULT_ONLY,  # a check that may refuse the teacher, never changes it
    "teacher.cache_dir": NO_EFFECT,  # where trained teachers are kept; found there by key
    # How the frozen teacher runs: no_grad vs inference_mode, memory layout and Inductor kernels
    # may round differently, so the logits' last bits can change.
    "teacher.inference_mode": IN_OUTPUTS,
    "teacher.channels_last": IN_OUTPUTS,
    "teacher.compile": IN_OUTPUTS,
    # The members and how their outputs are combined (distill/models/ensemble.py). A member the
    # pipeline trains is keyed by its own entry (ensemble.member_recipe reads it as a one-teacher
    # recipe), so the list itself enters no trained-teacher key.
    "teacher.ensemble": IN_OUTPUTS,
    "teacher.combine": IN_OUTPUTS,
    # The output cache replays the outputs it keys; top-k mode (budget_mb, topk) approximates the
    # soft targets, so it changes the result but not the teacher's outputs (the cache keys its
    # own encoding). enabled: replay in top-k mode is not what a recomputing run trains on.
    "teacher.output_cache.enabled": RESULT_ONLY,
    "teacher.output_cache.dir": NO_EFFECT,  # where the cache lives; found there by key
    "teacher.output_cache.budget_mb": RESULT_ONLY,
    "teacher.output_cache.topk": RESULT_ONLY,
    "teacher.output_cache.verify_every": NO_EFFECT,  # how often replay is checked, not what it gives
    # teacher.train: everything that trains the teacher (teacher_stage.train_teacher).
    "teacher.train.epochs": IN_TEACHER,
    "teacher.train.batch_size": IN_TEACHER,
    "teacher.train.grad_accum_steps": IN_TEACHER,
    "teacher.train.opt": IN_TEACHER,
    "teacher.train.fused": IN_TEACHER,  # the fused kernel rounds differently
    "teacher.train.lr": IN_TEACHER,
    "teacher.train.lr_scale_batch": IN_TEACHER,
    "teacher.train.momentum": IN_TEACHER,
    "teacher.train.weight_decay": IN_TEACHER,
    "teacher.train.sched": IN_TEACHER,
    "teacher.train.warmup_epochs": IN_TEACHER,
    "teacher.train.warmup_lr": IN_TEACHER,
    "teacher.train.min_lr": IN_TEACHER,
    "teacher.train.clip_grad": IN_TEACHER,
    "teacher.train.label_smoothing": IN_TEACHER,
    "teacher.train.drop_path": IN_TEACHER,
    "teacher.train.seed": IN_TEACHER,  # init, order, views and mixup of the teacher stage
    # -- student ---------------------------------------------------------------------------------
    # The input spec comes from a probe of the student (pipeline.student_input_spec): its registry
    # config's mean/std, crop_pct and interpolation, and its image size. The teacher is trained
    # on it and fed it (distillation.token, below, picks the probed model too).
    "student.model": IN_TEACHER,
    "student.img_size": IN_TEACHER,
    # The rest shapes the student only: input_size is patch_embed.img_size, whatever the patch.
    "student.patch_size": RESULT_ONLY,
    "student.stem": RESULT_ONLY,  # the student's patch embedding, not its input
    "student.stem_stages": RESULT_ONLY,
    "student.init_checkpoint": RESULT_ONLY,  # which weights the student starts from
    "student.init_heads": RESULT_ONLY,
    "student.embed_dim": RESULT_ONLY,
    "student.depth": RESULT_ONLY,
    "student.num_heads": RESULT_ONLY,
    "student.mlp_ratio": RESULT_ONLY,
    "student.drop_path": RESULT_ONLY,
    "student.init": RESULT_ONLY,  # weights only; the probe that fixes the input spec is not initialised
    # -- distillation ----------------------------------------------------------------------------
    "distillation.type": RESULT_ONLY,
    "distillation.alpha": RESULT_ONLY,
    "distillation.tau": RESULT_ONLY,  # applied to logits after the teacher, not inside it
    "distillation.kl_norm": RESULT_ONLY,
    # The input spec is read from the distilled model's registry config either way
    # (pipeline.student_input_spec), so the token changes the student only.
    "distillation.token": RESULT_ONLY,
    # -- train (the student's; the teacher stage reads teacher.train) --------------------------
    "train.epochs": RESULT_ONLY,  # epoch e's stream is a function of (data seed, e), not of the total
    # The global batch and its split into micro-batches fix the rows of each micro-step (and so
    # each mixup/cutmix pair) and the rows per epoch (truncated to whole global batches).
    "train.batch_size": IN_OUTPUTS,
    "train.grad_accum_steps": IN_OUTPUTS,
    "train.opt": RESULT_ONLY,
    "train.fused": RESULT_ONLY,
    "train.lr": RESULT_ONLY,
    "train.lr_scale_batch": RESULT_ONLY,
    "train.momentum": RESULT_ONLY,
    "train.weight_decay": RESULT_ONLY,
    "train.sched": RESULT_ONLY,
    "train.warmup_epochs": RESULT_ONLY,
    "train.warmup_lr": RESULT_ONLY,
    "train.min_lr": RESULT_ONLY,
    "train.clip_grad": RESULT_ONLY,
    "train.label_smoothing": RESULT_ONLY,  # labels only: the teacher sees images, never targets
    "train.precision": IN_TEACHER,  # one precision per launch: the teacher stage trains under it
    "train.ema_decay": RESULT_ONLY,
    # A speed switch: the student's compiled run is tested to train like the eager one. The
    # teacher stage runs under it too (Accelerate compiles what it prepares), and a teacher
    # trained either way is shared (one teacher per study).
    "train.compile": RESULT_ONLY,
    # The student's attention kernel (the same arithmetic, rounded differently; auto picks one
    # by device and precision); the teacher stage trains a convnet, which has none.
    "train.attention": RESULT_ONLY,
    # TF32 rounds the inputs of every matrix product on a GPU: the teacher stage trains and the
    # teacher runs under it, so trained teachers and their outputs differ with it.
    "train.tf32": IN_TEACHER,
    # -- eval ----------------------------------------------------------------------------------
    # Val batch composition (the last bits of batched kernels); the teacher stage evaluates
    # with it too, but only to report, never to choose weights.
    "eval.batch_size": IN_OUTPUTS,
    "eval.every_epochs": RESULT_ONLY,  # which epochs log val metrics and may become 'best'
}


def effects(path: str) -> frozenset[Effect]:
    """The effects of a dotted key from a recipe tree: a field's own; a key inside a free-form
    dict field (``teacher.model_args.depth``), the field's; a whole section (``teacher.train``
    when it is None), the union of its fields'; a key the schema lacks, every effect."""
    if path in TABLE:
        return TABLE[path]
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in TABLE:
            return TABLE[head]
    below = [e for p, e in TABLE.items() if p.startswith(path + ".")]
    return frozenset().union(*below) if below else UNKNOWN


def fields(recipe: Recipe, effect: Effect) -> dict[str, Any]:
    """The recipe's value of every field with ``effect``, JSON-able, sorted by dotted path.
    Fields of an absent optional section (``teacher.train`` None) read None; a field that cannot
    act in this recipe (``INERT``) reads its default, so setting it changes no cache key."""
    tree = recipe.model_dump(mode="json")
    inert = inert_fields(tree)
    paths = [p for p in sorted(TABLE) if effect in TABLE[p]]
    return {p: inert[p] if p in inert else _lookup(tree, p) for p in paths}


def changed_for_resume(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose change alters a resumed run's result, between two recipe trees (nested
    dicts as in recipe.yaml): those that differ, or are in one tree only, and have RESULT effect.
    Keys the schema does not know count as RESULT; the provenance block is ignored."""
    a, b = _flatten(old), _flatten(new)
    changed = (k for k in sorted(a.keys() | b.keys()) if (k not in a or k not in b or a[k] != b[k]))
    return [k for k in changed if RESULT in effects(k)]


def stream_layout(data: DataConfig, processes: int) -> dict[str, int] | None:
    """What a stream-mode epoch depends on besides recipe fields: the processes and the loader
    workers per process reading it (data/stream.py: every one reads its own shards); None in
    random mode, where neither changes the order or a view. A trained teacher is keyed on it
    and a resume refuses another."""
    if data.shard_access != "stream":
        return None
    return {"processes": processes, "workers": max(1, data.num_workers)}


def all_fields() -> list[str]:
    """Every leaf field of the recipe schema as a dotted path, sorted; optional sections
    (``teacher.train``) are walked, free-form dicts (``teacher.model_args``) are leaves."""
    return sorted(_leaves(Recipe, ""))


def _leaves(model: type[BaseModel], prefix: str) -> list[str]:
    out: list[str] = []
    for name, info in model.model_fields.items():
        section = section_model(info.annotation)
        out += [prefix + name] if section is None else _leaves(section, f"{prefix}{name}.")
    return out


def _lookup(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if node is None:  # inside an optional section that is absent
            return None
        node = node[part]
    return node


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': v}} -> {'a.b': v}, stopping at table fields (a free-form dict stays whole);
    values are kept as they are, so 1 == 1.0 and a list compares by its items."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path == PROVENANCE_KEY:
            continue
        if isinstance(value, dict) and value and path not in TABLE:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def data_fields(data: DataConfig, effect: Effect) -> dict[str, Any]:
    """Like ``fields`` for the data section alone (``data.load_source`` has no whole recipe)."""
    tree = {"data": data.model_dump(mode="json")}
    inert = inert_fields(tree)
    paths = [p for p in sorted(TABLE) if p.startswith("data.") and effect in TABLE[p]]
    return {p: inert[p] if p in inert else _lookup(tree, p) for p in paths}


# ---------------------------------------------------------------------------------------------
# Settings that cannot act


@dataclass(frozen=True)
class Inert:
    """When a key (or every field of a section) cannot act: ``why(tree)`` is the reason, None
    when it acts. ``error``: setting it anyway is refused (the user believes the run reads
    something it does not); otherwise a warning line names it."""

    why: Callable[[dict[str, Any]], str | None]
    error: bool = False
    fix: str = "remove it"  # what the refusal suggests


def get_path(tree: dict[str, Any], path: str) -> Any:
    """``_lookup`` that reads None for a section the tree lacks (``data_fields``' data-only tree)."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _unless(path: str, allowed: tuple[Any, ...], what: str) -> Callable[[dict[str, Any]], str | None]:
    def why(tree: dict[str, Any]) -> str | None:
        value = get_path(tree, path)
        if value is None and path.split(".")[0] not in tree:
            return None  # a tree without that section (data_fields): cannot tell
        return None if value in allowed else f"{path}={value} {what}"

    return why


def _when_set(path: str, what: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda tree: f"{path} is given: {what}" if get_path(tree, path) is not None else None


def _when_unset(path: str, what: str) -> Callable[[dict[str, Any]], str | None]:
    def why(tree: dict[str, Any]) -> str | None:
        return f"{path} is not set: {what}" if path.split(".")[0] in tree and get_path(tree, path) is None else None

    return why


def _val_fraction(tree: dict[str, Any]) -> str | None:
    if get_path(tree, "data.val_split") is not None:
        return f"data.val_split={get_path(tree, 'data.val_split')} names the validation split (nothing is held out)"
    return "data.source=synthetic has a validation split" if get_path(tree, "data.source") == "synthetic" else None


def _no_warmup(section: str) -> Callable[[dict[str, Any]], str | None]:
    def why(tree: dict[str, Any]) -> str | None:
        return f"{section}.warmup_epochs=0 (no warm-up)" if get_path(tree, f"{section}.warmup_epochs") == 0 else None

    return why


_SOFT = _unless("distillation.type", ("soft",), "has no temperature or KL term")
_TEACHER_TRAIN = _when_set("teacher.checkpoint", "the teacher is loaded, not trained")
_NO_INIT = _when_unset("student.init", "the student starts from random weights")

# Keys that cannot act in some recipes, by dotted path or section; a key the user sets there (a
# value other than the default) is refused or warned about (recipe.checks.check_settings), and caches key
# on its default instead (``fields``, ``data_fields``). Each rule mirrors the code that reads the
# key: data.load_source, the loss (training.losses), the teacher stage, student.init, the optimizer.
INERT: dict[str, Inert] = {
    "data.path": Inert(
        _unless("data.source", ("imagefolder", "hub", "shards"), "reads no path"),
        error=True,
        fix="set data.source=imagefolder (a folder of class sub-folders), hub (a dataset name) or shards "
        "(a folder distill.shard wrote), or remove data.path",
    ),
    # A warning only: a recipe switched to the shards written from its Hub dataset keeps it.
    "data.hub_config": Inert(_unless("data.source", ("hub",), "is not a Hub dataset")),
    "data.synthetic": Inert(_unless("data.source", ("synthetic",), "generates no synthetic images")),
    "data.verify_shards": Inert(_unless("data.source", ("shards",), "reads no shards")),
    "data.val_fraction": Inert(_val_fraction),
    "teacher.train": Inert(_TEACHER_TRAIN),
    "distillation.tau": Inert(_SOFT),
    "distillation.kl_norm": Inert(_SOFT),
    "distillation.alpha": Inert(_unless("distillation.type", ("soft", "hard"), "has no teacher term")),
    "student.init_checkpoint": Inert(_NO_INIT),
    "student.init_heads": Inert(_NO_INIT),
    "student.stem_stages": Inert(_when_unset("student.stem", "the student has no convolutional stem")),
    "train.momentum": Inert(_unless("train.opt", ("sgd",), "has no momentum setting")),
    "train.warmup_lr": Inert(_no_warmup("train")),
    "teacher.train.momentum": Inert(_unless("teacher.train.opt", ("sgd", None), "has no momentum setting")),
    "teacher.train.warmup_lr": Inert(_no_warmup("teacher.train")),
}


@cache
def _default_tree() -> dict[str, Any]:
    """The default recipe; an optional section (``teacher.train``) reads None."""
    return Recipe().model_dump(mode="json")


@cache
def field_defaults() -> dict[str, Any]:
    """Every table field's default, an optional section's fields at their section's defaults."""
    out: dict[str, Any] = {}
    for path in TABLE:
        model: Any = Recipe
        for part in path.split("."):
            info = model.model_fields[part]
            section = section_model(info.annotation)
            if section is None:
                out[path] = model().model_dump(mode="json")[part] if model is not Recipe else None
                break
            model = section
        else:
            out[path] = None
    return out


def covered(rule: str) -> list[str]:
    return [p for p in sorted(TABLE) if p == rule or p.startswith(rule + ".")]


def optional_section(rule: str) -> bool:
    return get_path(_default_tree(), rule) is None and len(covered(rule)) > 1


def inert_fields(tree: dict[str, Any]) -> dict[str, Any]:
    """Every table field that cannot act in ``tree`` (a recipe dumped as JSON), with the value a
    cache keys on instead: its default (None for an optional section's fields: the section absent)."""
    out: dict[str, Any] = {}
    for rule, inert in INERT.items():
        if inert.why(tree) is not None:
            if optional_section(rule):  # the section as if absent, whatever its fields' own rules say
                out.update(dict.fromkeys(covered(rule)))
            else:
                for p in covered(rule):
                    out.setdefault(p, field_defaults()[p])
    return out
