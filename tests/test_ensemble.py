"""Teacher ensembles (distill/models/ensemble.py): the combination on hand-made logits, the
recipe's refusals, and (slow) hard and soft smoke runs with two members at different sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import RecipeError, TeacherError
from distill.models.ensemble import EnsembleTeacher, combine_logits, member_config, normalised_weights
from distill.models.spec import InputSpec
from distill.recipe.schema import Recipe, load_recipe
from distill.training.losses import hard_kd, soft_kd

# Two members, two images, three classes.
Z1 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
Z2 = torch.tensor([[0.0, 3.0, 0.0], [1.0, -2.0, 4.0]])


def test_normalised_weights_divide_by_the_sum_and_refuse_bad_sets() -> None:
    assert normalised_weights([1, 3]) == [0.25, 0.75]
    assert normalised_weights([0, 2]) == [0.0, 1.0]
    for bad in ([], [-1, 2], [0, 0]):
        with pytest.raises(TeacherError, match="must be >= 0 with a positive sum"):
            normalised_weights(bad)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_probs_soft_targets_are_the_weighted_mean_of_the_members_softmax(tau: float) -> None:
    out = combine_logits([Z1, Z2], [1.0, 3.0], "probs", tau)
    mixture = 0.25 * F.softmax(Z1 / tau, -1) + 0.75 * F.softmax(Z2 / tau, -1)
    # What soft_kd takes as the teacher's distribution: softmax(out / tau).
    torch.testing.assert_close(F.softmax(out / tau, -1), mixture, rtol=0, atol=1e-6)
    # Pinned by hand: image 0 at tau 1 is 0.25 * softmax([2,0,-1]) + 0.75 * softmax([0,3,0]).
    if tau == 1.0:
        torch.testing.assert_close(mixture[0], torch.tensor([0.2449, 0.7106, 0.0445]), rtol=0, atol=1e-4)
    # The soft loss against the ensemble equals the loss against the mixture written out.
    student = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    by_hand = (mixture * (mixture.log() - F.log_softmax(student / tau, -1))).sum() / 2 * tau * tau
    torch.testing.assert_close(soft_kd(student, out, tau), by_hand, rtol=1e-5, atol=1e-6)


def test_probs_hard_target_is_the_mixtures_argmax() -> None:
    out = combine_logits([Z1, Z2], [1.0, 1.0], "probs", 1.0)
    mixture = 0.5 * F.softmax(Z1, -1) + 0.5 * F.softmax(Z2, -1)
    assert out.argmax(-1).tolist() == mixture.argmax(-1).tolist() == [1, 2]
    student = torch.zeros(2, 3)
    torch.testing.assert_close(hard_kd(student, out), F.cross_entropy(student, torch.tensor([1, 2])))


def test_logits_combination_is_the_weighted_mean_of_logits() -> None:
    out = combine_logits([Z1, Z2], [1.0, 3.0], "logits", 2.0)
    torch.testing.assert_close(out, 0.25 * Z1 + 0.75 * Z2)
    assert out[0].tolist() == [0.5, 2.25, -0.25]


def test_a_zero_weight_member_drops_out_and_one_member_is_itself() -> None:
    torch.testing.assert_close(
        F.softmax(combine_logits([Z1, Z2], [0.0, 1.0], "probs", 1.0), -1), F.softmax(Z2, -1), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(combine_logits([Z1], [5.0], "probs", 2.0), 2.0 * F.log_softmax(Z1 / 2.0, -1))


class _Fixed:
    """A teacher that returns fixed logits (the Teacher interface)."""

    def __init__(self, logits: torch.Tensor, name: str, size: int) -> None:
        self.logits, self.architecture = logits, name
        self.spec = InputSpec((size, size), (0.5,) * 3, (0.5,) * 3, 1.0, "bicubic")
        self.trained_here = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits

    def fingerprint(self) -> str:
        return self.architecture

    def describe(self) -> dict[str, object]:
        return {"architecture": self.architecture, "sha256": f"sha-{self.architecture}", "val_top1": math.nan}

    def copy_to(self, folder: object) -> None:
        raise NotImplementedError


def test_ensemble_teacher_combines_keys_and_describes_its_members() -> None:
    a, b = _Fixed(Z1, "resnet10t", 16), _Fixed(Z2, "vit_tiny", 24)
    ens = EnsembleTeacher([a, b], [1.0, 3.0], "probs", 2.0)
    torch.testing.assert_close(ens(torch.zeros(2, 3, 16, 16)), combine_logits([Z1, Z2], [1, 3], "probs", 2.0))
    assert ens.spec.size == (24, 24) and ens.architecture == "ensemble(resnet10t+vit_tiny)"
    ens.member_top1, ens.val_top1 = [0.5, 0.75], 0.8
    d = ens.describe()
    assert [(m["architecture"], m["sha256"], m["weight"], m["val_top1"]) for m in d["members"]] == [
        ("resnet10t", "sha-resnet10t", 0.25, 0.5),
        ("vit_tiny", "sha-vit_tiny", 0.75, 0.75),
    ]
    assert d["val_top1"] == 0.8 and d["combine"] == "probs" and d["sha256"] == ens.fingerprint()
    # The fingerprint follows the members, their shares, the combination and (probs only) tau.
    same = EnsembleTeacher([a, b], [2.0, 6.0], "probs", 2.0).fingerprint()
    assert same == ens.fingerprint()
    assert EnsembleTeacher([a, b], [1.0, 1.0], "probs", 2.0).fingerprint() != ens.fingerprint()
    assert EnsembleTeacher([a, b], [1.0, 3.0], "probs", 1.0).fingerprint() != ens.fingerprint()
    logits_1 = EnsembleTeacher([a, b], [1.0, 3.0], "logits", 1.0).fingerprint()
    assert logits_1 == EnsembleTeacher([a, b], [1.0, 3.0], "logits", 4.0).fingerprint() != ens.fingerprint()


# The recipe ------------------------------------------------------------------------------------


def smoke(*overrides: str) -> Recipe:
    return load_recipe("recipes/smoke.yaml", list(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.ensemble=[]", "teacher.ensemble is empty"),
        ("teacher.ensemble=[{weight: -1}, {weight: 2}]", r"weights \[-1.0, 2.0\] must be >= 0"),
        ("teacher.ensemble=[{weight: 0}, {weight: 0}]", r"weights \[0.0, 0.0\] must be >= 0 with a positive sum"),
        ("teacher.combine=mean", "teacher.combine"),
    ],
)
def test_bad_ensembles_are_refused_when_the_recipe_is_read(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        smoke(override)


def test_checkpoint_beside_an_ensemble_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"teacher\.checkpoint and teacher\.ensemble are both set"):
        smoke("teacher.checkpoint=x.safetensors", "teacher.ensemble=[{model: resnet18}]")


def test_a_member_reads_as_a_one_teacher_section() -> None:
    r = smoke("teacher.ensemble=[{model: resnet18, img_size: 24, weight: 2}, {checkpoint: t/, img_size: 16}]")
    first = member_config(r.teacher, r.teacher.ensemble[0])
    assert (first.model, first.img_size, first.ensemble, first.train) == ("resnet18", 24, None, r.teacher.train)
    second = member_config(r.teacher, r.teacher.ensemble[1])
    assert str(second.checkpoint) == "t" and second.train is None and second.img_size == 16
    # A member the pipeline trains is keyed as the one-teacher run with that teacher.
    one = smoke("teacher.model=resnet18", "teacher.img_size=24")
    assert first == one.teacher
