"""Teacher-output cache: compute the frozen teacher's logits once, replay them in later runs.

The view of image i in epoch e is a function of (data seed, e, i) (data.sample_seed), the
epoch's order of (data seed, e), and mixup/cutmix of (data seed, e, step, rank), so the tensor
the teacher sees at a given place in the data stream is fixed. Runs that share the data seed,
the teacher and the input pipeline (the types and seeds of a study with ``data.seed`` fixed)
can therefore share the teacher's outputs: the first run computes them, the others read them.

Layout: ``<dir>/<key>/`` holds ``key.json`` (everything the outputs depend on; the folder name is
its hash, so any change lands in a fresh folder: that is the invalidation), and per epoch a
memory-mapped array of rows plus a ``filled`` byte per row. A row is a position in the epoch's
stream, ``(micro_step x world + rank) x per_process_batch + i``, which is why world size and
per-process batch are part of the key (they also fix batch composition, on which the last bits
of batched kernels can depend). Validation outputs are rows keyed by image index.

Two encodings, chosen by ``budget_mb`` per epoch:

- ``full``: the fp32 logits, bit for bit. A run that replays them trains exactly as one that
  recomputes them (tests/test_teacher_cache.py pins this).
- ``topk``: the k largest log-probabilities in fp16 and their classes; the other classes share
  the remaining probability mass equally. Enough for hard distillation (the argmax is kept) and
  close for soft; not bit-identical (ImageNet-size runs, where full logits are 5 GB per epoch).

Every ``verify_every``-th replayed step, and the first of each epoch, is recomputed and compared
in the stored encoding; a difference stops the run (a cache that no longer matches its key must
never train silently). A crash between filling rows leaves them marked unfilled: they are
recomputed, so a killed run never leaves a half-written row behind to be trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from distill import __version__
from distill.data.pipeline import InputPipeline, data_seed
from distill.data.sources import SplitData
from distill.errors import TrainingError
from distill.recipe.keys import TEACHER_OUTPUTS, fields
from distill.recipe.schema import Recipe
from distill.training.optim import BatchPlan

KEY_FILE = "key.json"


def cache_key(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def labels_digest(labels: list[int]) -> str:
    """Identity of a split: its size and label sequence (a re-split or new subset changes it)."""
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


class _Rows:
    """One memory-mapped table: ``data`` arrays of ``rows`` rows plus a ``filled`` flag per row."""

    def __init__(self, stem: Path, rows: int, columns: dict[str, tuple[tuple[int, ...], Any]], create: bool) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in {**columns, "filled": ((), np.uint8)}.items():
            path = stem.with_name(f"{stem.name}.{name}.npy")
            if create and not path.exists():
                tmp = path.with_name(path.name + ".tmp.npy")
                np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *shape)).flush()
                tmp.replace(path)  # complete (zero-filled: nothing marked filled) or absent
            if not create:
                self.arrays[name] = np.load(path, mmap_mode="r+")

    def filled(self, rows: np.ndarray) -> bool:
        return bool(self.arrays["filled"][rows].all())

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v[rows]) for k, v in self.arrays.items() if k != "filled"}

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        for k, v in values.items():
            self.arrays[k][rows] = v
        self.arrays["filled"][rows] = 1  # after the data: a row is trusted only once complete

    def flush(self) -> None:
        for a in self.arrays.values():
            a.flush()


class TeacherOutputCache:
    """Replays (or computes and stores) the teacher's logits for each training micro-step."""

    def __init__(
        self,
        accelerator: Accelerator,
        root: Path,
        key_fields: dict[str, Any],
        num_classes: int,
        rows_per_epoch: int,
        per_process_batch: int,
        val_rows: int,
        budget_mb: float,
        topk: int,
        verify_every: int,
    ) -> None:
        self.accelerator = accelerator
        self.num_classes, self.rows_per_epoch, self.batch = num_classes, rows_per_epoch, per_process_batch
        self.val_rows, self.verify_every = val_rows, verify_every
        full_mb = rows_per_epoch * num_classes * 4 / 2**20
        self.mode = "full" if full_mb <= budget_mb or topk >= num_classes else "topk"
        self.k = min(topk, num_classes)
        fields = {**key_fields, "encoding": self.mode if self.mode == "full" else f"topk{self.k}"}
        self.key = cache_key(fields)
        self.dir = Path(root) / self.key
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            key_file = self.dir / KEY_FILE
            if not key_file.exists():
                key_file.write_text(json.dumps(fields, indent=1, sort_keys=True, default=str))
        accelerator.wait_for_everyone()
        self._tables: dict[str, _Rows] = {}
        self.stats = {"train_replayed": 0, "train_computed": 0, "val_replayed": 0, "val_computed": 0, "verified": 0}

    # -- encoding ---------------------------------------------------------------------------

    def _columns(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        if self.mode == "full":
            return {"logits": ((self.num_classes,), np.float32)}
        idx = np.int16 if self.num_classes <= np.iinfo(np.int16).max else np.int32
        return {"logp": ((self.k,), np.float16), "classes": ((self.k,), idx)}

    def _encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        logits = logits.detach().float().cpu()
        if self.mode == "full":
            return {"logits": logits.numpy()}
        logp, classes = torch.log_softmax(logits, dim=-1).topk(self.k, dim=-1)
        return {"logp": logp.half().numpy(), "classes": classes.numpy().astype(self._columns()["classes"][1])}

    def _decode(self, values: dict[str, np.ndarray]) -> torch.Tensor:
        device = self.accelerator.device
        if self.mode == "full":
            return torch.from_numpy(values["logits"]).to(device)
        logp = torch.from_numpy(values["logp"]).float()
        classes = torch.from_numpy(values["classes"].astype(np.int64))
        rest = (1.0 - logp.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / max(self.num_classes - self.k, 1)
        out = rest.log().expand(-1, self.num_classes).clone()
        return out.scatter_(-1, classes, logp).to(device)  # log-probabilities: softmax/argmax as logits

    # -- tables ----------------------------------------------------------------------------

    def _table(self, name: str, rows: int) -> _Rows:
        """Collective on first use of ``name``: the main process creates the files, all open them."""
        if name not in self._tables:
            stem = self.dir / name
            if self.accelerator.is_main_process:
                _Rows(stem, rows, self._columns(), create=True)
            self.accelerator.wait_for_everyone()
            self._tables[name] = _Rows(stem, rows, self._columns(), create=False)
        return self._tables[name]

    def begin_epoch(self, epoch: int) -> None:
        """Collective: open (creating if needed) epoch ``epoch``'s table; flush the previous ones."""
        for t in self._tables.values():
            t.flush()
        self._table(f"epoch_{epoch:04d}", self.rows_per_epoch)

    def open_val(self) -> None:
        """Collective: open the validation table."""
        self._table("val", self.val_rows)

    # -- lookups ---------------------------------------------------------------------------

    def _lookup(
        self, table: _Rows, rows: np.ndarray, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
        verify: bool, where: str, split: str,
    ) -> torch.Tensor:  # fmt: skip
        if table.filled(rows):
            stored = table.read(rows)
            if verify:
                fresh = self._encode(compute(images))
                same = all(np.array_equal(fresh[k], stored[k]) for k in stored)
                if not same:
                    raise TrainingError(
                        f"the teacher-output cache {self.dir} disagrees with a fresh teacher pass at "
                        f"{where}: it does not belong to this teacher, data or input pipeline. Delete "
                        "that folder (it is rebuilt), or set teacher.output_cache.enabled=false"
                    )
                self.stats["verified"] += 1
            self.stats[f"{split}_replayed"] += len(rows)
            return self._decode(stored)
        logits = compute(images)
        table.write(rows, self._encode(logits))
        self.stats[f"{split}_computed"] += len(rows)
        return logits if self.mode == "full" else self._decode(self._encode(logits))

    def train_logits(
        self, epoch: int, micro_step: int, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The teacher's logits for this process's micro-batch ``micro_step`` of ``epoch``.

        Top-k encoding returns the decoded form even when freshly computed, so that a run is the
        same function of its inputs whether it filled the cache or replayed it."""
        acc = self.accelerator
        start = (micro_step * acc.num_processes + acc.process_index) * self.batch
        rows = np.arange(start, start + images.shape[0])
        verify = self.verify_every > 0 and (micro_step % self.verify_every == 0)
        where = f"epoch {epoch + 1}, micro-step {micro_step}, process {acc.process_index}"
        return self._lookup(self._tables[f"epoch_{epoch:04d}"], rows, images, compute, verify, where, "train")

    def val_logits(
        self, indices: torch.Tensor, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor], first: bool
    ) -> torch.Tensor:
        rows = indices.cpu().numpy()
        verify = first and self.verify_every > 0
        return self._lookup(self._tables["val"], rows, images, compute, verify, "validation", "val")

    def summary(self) -> dict[str, Any]:
        """For summary.json and the report: where the teacher's outputs came from. Counts are
        this process's times the world size (every process sees the same number of images)."""
        world = self.accelerator.num_processes
        counts = {f"{k}_images" if k != "verified" else "verified_batches": v * world for k, v in self.stats.items()}
        seen = self.stats["train_replayed"] + self.stats["train_computed"]
        return {
            "enabled": True,
            "dir": str(self.dir),
            "key": self.key,
            "encoding": self.mode if self.mode == "full" else f"topk{self.k}",
            **counts,
            "train_replayed_fraction": self.stats["train_replayed"] / seen if seen else math.nan,
        }

    def close(self) -> None:
        for t in self._tables.values():
            t.flush()
        self._tables.clear()


def open_output_cache(
    accelerator: Accelerator, recipe: Recipe, teacher: Any, split: SplitData, pipeline: InputPipeline, plan: BatchPlan
) -> TeacherOutputCache | None:
    """The run's teacher-output cache when it is enabled and there is a teacher, else None.

    The folder is named by the hash of everything the outputs depend on: the recipe fields that
    keys.py marks TEACHER_OUTPUTS (the global batch and accumulation among them: they fix how
    many rows an epoch has and which images share a batch), the teacher's own fingerprint, the
    splits' identity, and what the recipe does not say (world size, resolved data path, device,
    versions)."""
    cfg = recipe.teacher.output_cache
    if not cfg.enabled or teacher is None:
        return None
    acc = accelerator
    outputs = fields(recipe, TEACHER_OUTPUTS)
    # run.seed and data.seed act only through the data seed they resolve to: runs of a study
    # with data.seed fixed and different run.seed share their outputs.
    outputs.pop("run.seed"), outputs.pop("data.seed")
    key = {
        "fields": outputs,
        "data_seed": data_seed(recipe),
        "teacher": teacher.fingerprint(),
        "train_split": [len(split.train), labels_digest(list(split.train["label"]))],
        "val_split": [len(split.val), labels_digest(list(split.val["label"]))],
        "world_size": acc.num_processes,
        "per_process_batch": plan.per_process,
        "torch": torch.__version__,
        "distill": __version__,  # how views are drawn and resampled may change between versions
        "store": pipeline.store,  # the resolved data path: its views differ from the other's
        "device": acc.device.type,
    }
    cache = TeacherOutputCache(
        acc,
        cfg.dir or recipe.run.output_dir / "teacher_outputs",
        key,
        split.num_classes,
        rows_per_epoch=len(pipeline.train_loader) * acc.num_processes * plan.per_process,
        per_process_batch=plan.per_process,
        val_rows=len(split.val),
        budget_mb=cfg.budget_mb,
        topk=cfg.topk,
        verify_every=cfg.verify_every,
    )
    acc.print(f"teacher outputs: cache {cache.dir} ({cache.mode if cache.mode == 'full' else f'top-{cache.k}'})")
    return cache
