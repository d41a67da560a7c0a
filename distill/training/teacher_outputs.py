"""Teacher-output cache: compute the frozen teacher's logits once, replay them in later runs.

The view of image i in epoch e is a function of (data seed, e, i) (data.sample_seed), the
epoch's order of (data seed, e), and mixup/cutmix of (data seed, e, step, rank), so the tensor
the teacher sees at a given place in the data stream is fixed. Runs that share the data seed,
the teacher and the input pipeline (the types and seeds of a study with ``data.seed`` fixed)
can therefore share the teacher's outputs: the first run computes them, the others read them.

Layout: ``<dir>/<key>/`` holds ``key.json`` (everything the outputs depend on; the folder name is
its hash, so any change lands in a fresh folder: that is the invalidation), and per epoch one file
per process, ``epoch_<e>.rank<r>.npz``: that process's rows plus a ``filled`` flag per row. A
process's row is a position in its own share of the epoch's stream, ``micro_step x
per_process_batch + i``, which is why world size and per-process batch are part of the key (they
also fix batch composition, on which the last bits of batched kernels can depend). Validation
outputs are ``val.rank<r>.npz``, rows keyed by image index.

Files shared between nodes and jobs: a process holds its tables in memory on its device while it
trains (a lookup is a slice of a device tensor: no copy through the host) and publishes a table
at the end of its epoch as a whole file, written under a unique temporary name (host, process id,
random part) and renamed into place. No two processes ever write one file, and a file is never
changed in place, so a network file system's clients never see a half-written page (memory-mapped
rows of several processes shared 4 KiB pages, which NFS clients do not keep coherent), and two
runs that share a key each publish a complete table: the last rename wins, both are valid.

Two encodings, chosen by ``budget_mb`` per epoch:

- ``full``: the fp32 logits, bit for bit. A run that replays them trains exactly as one that
  recomputes them (tests/test_teacher_cache.py pins this).
- ``topk``: the k largest log-probabilities in fp16 and their classes; the other classes share
  the remaining probability mass equally. Enough for hard distillation (the argmax is kept) and
  close for soft; not bit-identical (ImageNet-size runs, where full logits are 5 GB per epoch).

Every ``verify_every``-th replayed step, and the first of each epoch, is recomputed and compared
in the stored encoding; a difference stops the run (a cache that no longer matches its key must
never train silently). A killed run publishes nothing of the epoch it was in: those rows are
recomputed, so a half-written row is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
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
from distill.recipe.schema import OutputCacheConfig, Recipe
from distill.run.processes import tf32_state, unique_suffix
from distill.training.optim import BatchPlan

KEY_FILE = "key.json"
Columns = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name: (shape of a row, dtype)


def cache_key(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def device_identity(device: torch.device) -> dict[str, Any]:
    """What computes the teacher's outputs: kernels (and so the last bits) differ between GPU
    models and CUDA/cuDNN versions."""
    if device.type != "cuda":
        return {"type": device.type}
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def labels_digest(labels: list[int]) -> str:
    """Identity of a split: its size and label sequence (a re-split or new subset changes it)."""
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


class _Table:
    """One process's table: ``columns`` as tensors of ``rows`` rows on the device, a ``filled``
    flag per row on the host (the rows a lookup asks for are known there: no device sync)."""

    def __init__(self, path: Path, rows: int, columns: Columns, device: torch.device) -> None:
        self.path, self.dirty = path, False
        self.data = {
            k: torch.zeros((rows, *shape), dtype=dtype, device=device) for k, (shape, dtype) in columns.items()
        }
        self.filled = np.zeros(rows, dtype=bool)
        stored = _load(path, rows, columns)
        if stored is not None:
            self.filled = stored.pop("filled")
            for k, v in stored.items():
                self.data[k].copy_(torch.from_numpy(v))  # one copy per epoch

    def read(self, rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[rows] for k, v in self.data.items()}

    def write(self, rows: slice | torch.Tensor, host_rows: slice | np.ndarray, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.data[k][rows] = v
        self.filled[host_rows] = True
        self.dirty = True

    def publish(self) -> None:
        """Write the table as a whole under a unique temporary name, then rename it into place."""
        if not self.dirty:
            return
        arrays = {k: v.cpu().numpy() for k, v in self.data.items()}
        tmp = self.path.with_name(f"{self.path.name}.tmp.{unique_suffix()}.npz")
        try:
            np.savez(tmp, filled=self.filled, **arrays)
            os.replace(tmp, self.path)
        except OSError as exc:  # a cache that cannot be written costs a recomputation, not the run
            tmp.unlink(missing_ok=True)
            print(f"warning: teacher outputs not saved to {self.path} ({exc}); a later run recomputes them")
        self.dirty = False


def _load(path: Path, rows: int, columns: Columns) -> dict[str, np.ndarray] | None:
    """A published table's arrays, or None when there is none (or it does not fit: recomputed)."""
    try:
        with np.load(path) as z:
            stored = {k: z[k] for k in [*columns, "filled"]}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if stored["filled"].shape != (rows,) or any(stored[k].shape != (rows, *columns[k][0]) for k in columns):
        return None
    return stored


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
        cfg: OutputCacheConfig,
    ) -> None:
        self.accelerator = accelerator
        self.num_classes, self.rows_per_epoch, self.batch = num_classes, rows_per_epoch, per_process_batch
        self.verify_every = cfg.verify_every
        full_mb = rows_per_epoch * num_classes * 4 / 2**20
        self.mode = "full" if full_mb <= cfg.budget_mb or cfg.topk >= num_classes else "topk"
        self.k = min(cfg.topk, num_classes)
        fields = {**key_fields, "encoding": self.mode if self.mode == "full" else f"topk{self.k}"}
        self.key = cache_key(fields)
        self.dir = Path(root) / self.key
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            key_file = self.dir / KEY_FILE
            if not key_file.exists():  # the same text from every run of this key: any rename wins
                tmp = key_file.with_name(f"{KEY_FILE}.tmp.{unique_suffix()}")
                tmp.write_text(json.dumps(fields, indent=1, sort_keys=True, default=str))
                os.replace(tmp, key_file)
        accelerator.wait_for_everyone()
        self._tables: dict[str, _Table] = {}
        self.stats = {"train_replayed": 0, "train_computed": 0, "val_replayed": 0, "val_computed": 0, "verified": 0}

    # -- encoding ---------------------------------------------------------------------------

    def _columns(self) -> Columns:
        if self.mode == "full":
            return {"logits": ((self.num_classes,), torch.float32)}
        idx = torch.int16 if self.num_classes <= torch.iinfo(torch.int16).max else torch.int32
        return {"logp": ((self.k,), torch.float16), "classes": ((self.k,), idx)}

    def _encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form, computed on the logits' device."""
        logits = logits.detach().float()
        if self.mode == "full":
            return {"logits": logits}
        logp, classes = torch.log_softmax(logits, dim=-1).topk(self.k, dim=-1)
        return {"logp": logp.half(), "classes": classes.to(self._columns()["classes"][1])}

    def _decode(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.accelerator.device
        if self.mode == "full":
            return values["logits"].to(device)
        logp = values["logp"].float()
        classes = values["classes"].long()
        rest = (1.0 - logp.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / max(self.num_classes - self.k, 1)
        out = rest.log().expand(-1, self.num_classes).clone()
        return out.scatter_(-1, classes, logp).to(device)  # log-probabilities: softmax/argmax as logits

    # -- tables ----------------------------------------------------------------------------

    def _table(self, name: str, rows: int) -> _Table:
        """This process's table ``name``, loaded from its published file when there is one."""
        if name not in self._tables:
            path = self.dir / f"{name}.rank{self.accelerator.process_index}.npz"
            self._tables[name] = _Table(path, rows, self._columns(), self.accelerator.device)
        return self._tables[name]

    def begin_epoch(self, epoch: int) -> None:
        """Publish the previous epoch's table (if this run filled rows of it); open epoch ``epoch``'s."""
        for name in [n for n in self._tables if n.startswith("epoch_")]:
            self._tables.pop(name).publish()
        self._table(f"epoch_{epoch:04d}", self.rows_per_epoch // self.accelerator.num_processes)

    # -- lookups ---------------------------------------------------------------------------

    def _lookup(
        self, table: _Table, rows: slice | torch.Tensor, host_rows: slice | np.ndarray, images: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor], verify: bool, where: str, split: str,
    ) -> torch.Tensor:  # fmt: skip
        n = images.shape[0]
        if table.filled[host_rows].all():
            stored = table.read(rows)
            if verify:  # the one device-to-host wait of a replayed step, on verified steps only
                fresh = self._encode(compute(images))
                if not all(torch.equal(fresh[k], stored[k]) for k in stored):
                    raise TrainingError(
                        f"the teacher-output cache {self.dir} disagrees with a fresh teacher pass at "
                        f"{where}: it does not belong to this teacher, data or input pipeline. Delete "
                        "that folder (it is rebuilt), or set teacher.output_cache.enabled=false"
                    )
                self.stats["verified"] += 1
            self.stats[f"{split}_replayed"] += n
            return self._decode(stored)
        logits = compute(images)
        encoded = self._encode(logits)
        table.write(rows, host_rows, encoded)
        self.stats[f"{split}_computed"] += n
        return logits if self.mode == "full" else self._decode(encoded)

    def train_logits(
        self, epoch: int, micro_step: int, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The teacher's logits for this process's micro-batch ``micro_step`` of ``epoch``.

        Top-k encoding returns the decoded form even when freshly computed, so that a run is the
        same function of its inputs whether it filled the cache or replayed it."""
        acc = self.accelerator
        rows = slice(micro_step * self.batch, micro_step * self.batch + images.shape[0])
        verify = self.verify_every > 0 and (micro_step % self.verify_every == 0)
        where = f"epoch {epoch + 1}, micro-step {micro_step}, process {acc.process_index}"
        return self._lookup(self._tables[f"epoch_{epoch:04d}"], rows, rows, images, compute, verify, where, "train")

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
        """Publish what this run filled; free the device tables."""
        for t in self._tables.values():
            t.publish()
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
        "device": device_identity(acc.device),
        # Compiled kernels round differently from eager ones, and TF32 rounds every product's
        # inputs: both change the teacher's last bits (what the process applies, train.tf32).
        "compile": recipe.train.compile,
        "tf32": tf32_state() if acc.device.type == "cuda" else None,
    }
    cache = TeacherOutputCache(
        acc,
        cfg.dir or recipe.run.output_dir / "teacher_outputs",
        key,
        split.num_classes,
        rows_per_epoch=len(pipeline.train_loader) * acc.num_processes * plan.per_process,
        per_process_batch=plan.per_process,
        cfg=cfg,
    )
    acc.print(f"teacher outputs: cache {cache.dir} ({cache.mode if cache.mode == 'full' else f'top-{cache.k}'})")
    return cache
