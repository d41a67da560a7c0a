"""Several teachers as one: ``teacher.ensemble`` (docs/teachers.md).

Every member is a teacher as ``teacher`` alone would build it (its own input size, normalisation
and class order) and is fed the same student-space batch, mixed or not. Its fp32 logits ``z_m``
are combined with the normalised weights ``w_m = weight_m / sum(weights)``:

- ``probs``: ``out = tau * log(sum_m w_m * softmax(z_m / tau))``. The soft loss takes
  ``softmax(out / tau)`` = ``sum_m w_m softmax(z_m / tau)`` exactly (the mixture sums to one, so
  the softmax of its logarithm is itself): the student's soft targets at the distillation
  temperature are the weighted mean of the members' own soft targets. Hard distillation takes
  ``argmax(out)``, the mixture's argmax (the logarithm keeps the order).
- ``logits``: ``out = sum_m w_m z_m``; soft targets ``softmax(sum_m w_m z_m / tau)``.

The validation metrics that read teacher logits at temperature 1 (the student's val/kl and
agreement) see ``softmax(out)``: for ``probs`` at tau = 1 the mixture itself; at another tau the
mixture raised to the power tau and renormalised (the same argmax, so agreement is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from distill.errors import TeacherError
from distill.models.spec import InputSpec
from distill.models.teacher import Teacher
from distill.recipe.schema import Recipe, TeacherConfig, TeacherMemberConfig

Combine = Literal["probs", "logits"]


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """The members' shares: each weight over their sum (the schema refuses negatives and a zero sum;
    this refuses them again for callers that build an ensemble by hand)."""
    total = float(sum(weights))
    if not weights or any(w < 0 for w in weights) or not total > 0:
        raise TeacherError(f"ensemble weights {list(weights)} must be >= 0 with a positive sum")
    return [float(w) / total for w in weights]


def combine_logits(
    logits: Sequence[torch.Tensor], weights: Sequence[float], combine: Combine, tau: float
) -> torch.Tensor:
    """The ensemble's logits from the members' (same shape, fp32), as the module docstring derives."""
    w = normalised_weights(weights)
    stacked = torch.stack([z.float() for z in logits])  # (members, batch, classes)
    shares = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
    if combine == "logits":
        return (shares * stacked).sum(0)
    if combine != "probs":
        raise TeacherError(f"unknown teacher.combine '{combine}'; use probs or logits")
    # log sum_m w_m softmax(z_m / tau) in log space: a member with weight 0 adds log(0) = -inf, which
    # logsumexp ignores; the result is finite while one member has a positive weight.
    log_mix = torch.logsumexp(torch.log(shares) + torch.log_softmax(stacked / tau, dim=-1), dim=0)
    return tau * log_mix


def member_config(teacher: TeacherConfig, member: TeacherMemberConfig) -> TeacherConfig:
    """The one-teacher section a member amounts to: its own model, weights, size and normalisation,
    the recipe's teacher.train when it names neither weights nor a train section, and the shared
    settings of ``teacher`` (cache folders, speed switches, accuracy floor)."""
    own = member.model_dump(exclude={"weight"})
    if own["checkpoint"] is None and own["train"] is None:
        own["train"] = teacher.train.model_dump() if teacher.train is not None else None
    if own["model"] is None:  # a folder's recorded architecture, else the recipe's teacher.model
        own["model"] = _recorded_architecture(own["checkpoint"]) or teacher.model
    shared = teacher.model_dump(exclude={*own, "ensemble", "combine"})
    return TeacherConfig.model_validate({**shared, **own})


def member_recipe(recipe: Recipe, index: int) -> Recipe:
    """The recipe as a run with member ``index`` as its only teacher: its trained-teacher cache key
    is that of such a run, so a member is trained once and shared with one-teacher runs."""
    assert recipe.teacher.ensemble is not None
    cfg = member_config(recipe.teacher, recipe.teacher.ensemble[index])
    return recipe.model_copy(update={"teacher": cfg})


class EnsembleTeacher:
    """Members combined into one teacher (the Teacher interface of distill.models.teacher)."""

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float], combine: Combine, tau: float) -> None:
        if not members:
            raise TeacherError("an ensemble needs at least one member")
        if len(weights) != len(members):
            raise TeacherError(f"{len(members)} ensemble members but {len(weights)} weights")
        self.members, self.shares = list(members), normalised_weights(weights)
        self.combine, self.tau = combine, float(tau)
        # One spec for readers that want one: the member with the largest input (each member
        # resizes and re-normalises the student's batch to its own spec inside).
        self.spec: InputSpec = max((m.spec for m in self.members), key=lambda s: s.size[0] * s.size[1])
        self.architecture = "ensemble(" + "+".join(_name(m) for m in self.members) + ")"
        self.weights: Path | None = None  # no file of its own (the teacher stage reads it): each member has one
        self.trained_here = any(getattr(m, "trained_here", False) for m in self.members)
        self.val_top1 = math.nan  # the ensemble's, set by the teacher stage's check
        self.member_top1: list[float] = [math.nan] * len(self.members)

    def member_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [m(images) for m in self.members]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.member_logits(images), self.shares, self.combine, self.tau)

    def fingerprint(self) -> str:
        material = {
            "combine": self.combine,
            # tau shapes the 'probs' output only; 'logits' outputs are shared across tau.
            "tau": self.tau if self.combine == "probs" else None,
            "members": [[m.fingerprint(), w] for m, w in zip(self.members, self.shares, strict=True)],
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]

    def describe(self) -> dict[str, Any]:
        members = []
        for m, w, top1 in zip(self.members, self.shares, self.member_top1, strict=True):
            d = m.describe()
            members.append({**d, "weight": w, "val_top1": d.get("val_top1", top1) if math.isnan(top1) else top1})
        return {
            "architecture": self.architecture,
            "weights": None,
            "sha256": self.fingerprint(),  # the ensemble's identity; each member lists its file's
            "val_top1": self.val_top1,
            "trained_here": self.trained_here,
            "combine": self.combine,
            **({"tau": self.tau} if self.combine == "probs" else {}),
            "input": {"size": list(self.spec.size), "mean": list(self.spec.mean), "std": list(self.spec.std)},
            "members": members,
            **(
                {"train_time_s": sum(times)}
                if (times := [m["train_time_s"] for m in members if "train_time_s" in m])
                else {}
            ),
        }

    def copy_to(self, folder: Path) -> None:
        """Each member as a teacher folder ``<i>-<architecture>`` and ensemble.json naming them with
        their weights: a recipe's teacher.ensemble can point its members' checkpoints there."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        entries = []
        for i, (m, w) in enumerate(zip(self.members, self.shares, strict=True)):
            sub = folder / f"{i}-{_name(m)}"
            m.copy_to(sub)
            entries.append({"checkpoint": sub.name, "weight": w, "img_size": list(m.spec.size)})
        (folder / "ensemble.json").write_text(json.dumps({"combine": self.combine, "members": entries}, indent=1))


def _train_time(members: list[dict[str, Any]]) -> dict[str, float]:
    """The members' training time (the teacher stage's), where this run trained any."""
    times = [m["train_time_s"] for m in members if "train_time_s" in m]
    return {"train_time_s": sum(times)} if times else {}


def _recorded_architecture(checkpoint: Path | None) -> str | None:
    config = Path(str(checkpoint)).expanduser() / "config.json" if checkpoint is not None else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("architecture")


def _name(teacher: Teacher) -> str:
    return str(getattr(teacher, "architecture", None) or teacher.describe().get("architecture", "teacher"))
