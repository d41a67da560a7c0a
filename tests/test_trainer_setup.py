"""The run's set-up pieces, without training: the student's EMA, the trained-teacher key, the
teacher-output cache key, the input pipeline's prepare and the shared step, the recipe as it runs
(teacher.model against a teacher folder), the closing table and the launcher's thread count."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from accelerate import Accelerator

from distill.data.pipeline import build_pipeline, data_seed
from distill.data.sources import load_source
from distill.errors import RecipeError
from distill.models.spec import InputSpec
from distill.models.student import student_input_spec
from distill.recipe.schema import load_recipe
from distill.run.records import RunSummary
from distill.training.optim import batch_plan
from distill.training.step import Step, as_prepared
from distill.training.teacher_outputs import open_output_cache
from distill.training.teacher_stage import resolve_teacher_model, teacher_key
from distill.training.trainer import DistillRun, setup_student, summary_lines
from tests.helpers import SMOKE


def smoke(*overrides: str) -> Any:
    return load_recipe(SMOKE, list(overrides))


def test_ema_is_a_copy_of_the_prepared_student(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() moves the student to the accelerator's device; the EMA must follow it. A CPU
    machine has no second device, so here prepare converts the student to float64 instead: an
    EMA made before prepare (the defect) stays float32, one made from the prepared student
    matches it in dtype and device (ModelEmaV3 cannot live on the meta device)."""
    recipe = smoke("train.ema_decay=0.99")
    split = load_source(recipe.data)
    acc = Accelerator(cpu=True)
    real_prepare = acc.prepare

    def prepare(model: torch.nn.Module, *rest: Any) -> Any:
        prepared = real_prepare(model, *rest)
        return (prepared[0].to(torch.float64), *prepared[1:])

    monkeypatch.setattr(acc, "prepare", prepare)
    student = setup_student(acc, recipe, split, student_input_spec(recipe))
    ema = {(t.device, t.dtype) for t in student.ema.module.state_dict().values() if t.is_floating_point()}
    assert ema == {(torch.device("cpu"), torch.float64)}
    assert {(p.device, p.dtype) for p in student.model.parameters()} == ema


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ema_is_on_the_gpu_with_the_student() -> None:
    recipe = smoke("train.ema_decay=0.99")
    split = load_source(recipe.data)
    acc = Accelerator()
    student = setup_student(acc, recipe, split, student_input_spec(recipe))
    assert {t.device for t in student.ema.module.state_dict().values()} == {acc.device}
    assert {p.device for p in student.model.parameters()} == {acc.device}


def test_trained_teacher_key_ignores_the_data_seed_and_follows_the_teachers_settings() -> None:
    """The teacher stage draws its data stream from teacher.train.seed: the student's data seed
    (and run seed) must not retrain an identical teacher."""
    spec = student_input_spec(smoke())
    base = teacher_key(smoke(), spec, 4, 1)
    assert teacher_key(smoke("data.seed=7"), spec, 4, 1) == base
    assert teacher_key(smoke("run.seed=3"), spec, 4, 1) == base
    assert teacher_key(smoke("data.num_workers=2"), spec, 4, 1) == base
    assert teacher_key(smoke("teacher.train.lr=0.01"), spec, 4, 1) != base
    assert teacher_key(smoke("teacher.train.seed=1"), spec, 4, 1) != base
    assert teacher_key(smoke("data.augment.hflip=0.0"), spec, 4, 1) != base
    assert teacher_key(smoke(), spec, 4, 2) == base  # random mode: 2 processes train the same teacher


def test_in_stream_mode_the_teacher_key_and_a_resume_follow_the_processes_and_workers(tmp_path: Path) -> None:
    """Stream mode gives every process and loader worker its own shards: another count is
    another stream, so another trained teacher, and a resume that would read it is refused."""
    from distill.errors import RunStateError
    from distill.recipe.schema import PROVENANCE_KEY, recipe_to_dict
    from distill.run.rundir import RunDir

    stream = ("data.source=shards", "data.path=s", "data.shard_access=stream")
    spec = student_input_spec(smoke())
    base = teacher_key(smoke(*stream), spec, 4, 1)
    assert teacher_key(smoke(*stream, "data.num_workers=1"), spec, 4, 1) == base  # 0 and 1: one reader
    assert teacher_key(smoke(*stream, "data.num_workers=2"), spec, 4, 1) != base
    assert teacher_key(smoke(*stream), spec, 4, 2) != base

    run = RunDir(tmp_path / "run")
    (run.checkpoints / "step_00000004").mkdir(parents=True)
    (run.checkpoints / "step_00000004" / "progress.json").write_text("{}")
    record = {**recipe_to_dict(smoke(*stream, "data.num_workers=2")), PROVENANCE_KEY: {"world_size": 2}}
    run.recipe_file.write_text(yaml.safe_dump(record))
    assert run._decide(smoke(*stream, "data.num_workers=2"), 2) == "step_00000004"
    for recipe, processes in ((smoke(*stream, "data.num_workers=2"), 1), (smoke(*stream, "data.num_workers=3"), 2)):
        with pytest.raises(RunStateError, match=r"cannot resume .*: data.shard_access=stream gives every process"):
            run._decide(recipe, processes)
    record = {**recipe_to_dict(smoke("data.num_workers=2")), PROVENANCE_KEY: {"world_size": 2}}
    run.recipe_file.write_text(yaml.safe_dump(record))
    assert run._decide(smoke("data.num_workers=0"), 1) == "step_00000004"  # random mode: either is the same run


class FakeTeacher:
    def fingerprint(self) -> str:
        return "f" * 20


def output_cache_dir(tmp_path: Path, *overrides: str) -> tuple[Path, int]:
    recipe = smoke("teacher.output_cache.enabled=true", f"teacher.output_cache.dir={tmp_path}", *overrides)
    split = load_source(recipe.data)
    acc = Accelerator(cpu=True)
    plan = batch_plan(recipe.train, 1, "train")
    pipeline = build_pipeline(
        recipe.data, split, student_input_spec(recipe), data_seed(recipe),
        per_process_batch=plan.per_process, global_batch=plan.global_batch, eval_batch=32, label_smoothing=0.0,
    )  # fmt: skip
    cache = open_output_cache(acc, recipe, FakeTeacher(), split, pipeline, plan)
    assert cache is not None
    return cache.dir, cache.rows_per_epoch


def test_output_cache_key_holds_the_batch_layout(tmp_path: Path) -> None:
    """Same per-process batch (16), global batch 16 or 48 (3 accumulation steps): an epoch is
    truncated to a multiple of the global batch, so of the 128 smoke images 128 or 96 rows are
    used. Before the fix both landed in one folder and a replay indexed past the smaller table."""
    one, rows_one = output_cache_dir(tmp_path, "train.batch_size=16", "train.grad_accum_steps=1")
    three, rows_three = output_cache_dir(tmp_path, "train.batch_size=48", "train.grad_accum_steps=3")
    assert (rows_one, rows_three) == (128, 96)
    assert one != three
    again, _ = output_cache_dir(tmp_path, "train.batch_size=16", "train.grad_accum_steps=1", "data.num_workers=1")
    assert again == one  # how the data is read is not part of the key


def test_prepare_is_the_only_place_that_applies_the_tensor_paths_view() -> None:
    recipe = smoke("data.store=tensor")
    split = load_source(recipe.data)
    spec = student_input_spec(recipe)
    pipeline = build_pipeline(
        recipe.data, split, spec, 0, per_process_batch=8, global_batch=8, eval_batch=8, label_smoothing=0.0
    )
    assert pipeline.store == "tensor"
    batch = next(iter(pipeline.train_loader))
    assert batch["image"].dtype == torch.uint8  # the loader hands over decoded pixels only
    images, targets = pipeline.prepare(batch, epoch=1)
    assert images.dtype == torch.float32 and images.shape == (8, 3, *spec.size)
    assert torch.equal(targets, batch["label"])
    again, _ = pipeline.prepare(batch, epoch=1)
    other, _ = pipeline.prepare(batch, epoch=2)
    assert torch.equal(images, again) and not torch.equal(images, other)  # a function of (seed, epoch, index)


def test_input_spec_of_the_smoke_student() -> None:
    spec = student_input_spec(smoke())
    assert spec == InputSpec((16, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, "bicubic")
    assert spec.timm_config()["input_size"] == (3, 16, 16)


def test_step_without_distillation_is_the_teacher_stages_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    batch = {"image": torch.zeros(2, 1), "label": torch.tensor([0, 0])}
    parts = Step(as_prepared, label_smoothing=0.0)(lambda x: logits, batch, 0, 0)
    expected = torch.nn.functional.cross_entropy(logits, batch["label"])
    assert float(parts.total) == pytest.approx(float(expected), rel=1e-6)
    assert float(parts.kd) == 0.0


def test_step_feeds_the_teacher_the_prepared_images() -> None:
    seen: list[torch.Tensor] = []

    def teacher(images: torch.Tensor) -> torch.Tensor:
        seen.append(images)
        return torch.tensor([[0.0, 5.0], [5.0, 0.0]])

    def prepare(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"] + epoch, batch["label"]

    student = (torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 2.0]]))
    d = smoke("distillation.type=hard", "distillation.alpha=0.5").distillation
    step = Step(prepare, label_smoothing=0.0, distillation=d, teacher=teacher)  # type: ignore[arg-type]
    parts = step(lambda x: student, {"image": torch.zeros(2, 1), "label": torch.tensor([0, 0])}, 3, 0)
    assert torch.equal(seen[0], torch.full((2, 1), 3.0))
    ce = torch.nn.functional.cross_entropy(student[0], torch.tensor([0, 0]))
    kd = torch.nn.functional.cross_entropy(student[1], torch.tensor([1, 0]))
    assert float(parts.total) == pytest.approx(0.5 * float(ce) + 0.5 * float(kd), rel=1e-6)


def test_train_attention_manual_switches_every_block_and_computes_the_same() -> None:
    """train.attention=manual: timm's plain matrix products instead of F.scaled_dot_product_attention
    (the bf16 CPU step's bottleneck, README Speed); the same function, rounded differently."""
    from distill.models.student import build_student, set_attention

    recipe = smoke("train.attention=manual", "train.ema_decay=0.99")
    split = load_source(recipe.data)
    student = setup_student(Accelerator(cpu=True), recipe, split, student_input_spec(recipe))
    blocks = [m for m in student.model.modules() if hasattr(m, "fused_attn")]
    assert len(blocks) == recipe.student.depth and not any(m.fused_attn for m in blocks)
    ema_blocks = [m for m in student.ema.module.modules() if hasattr(m, "fused_attn")]  # a copy: evaluated too
    assert len(ema_blocks) == recipe.student.depth and not any(m.fused_attn for m in ema_blocks)
    default = setup_student(Accelerator(cpu=True), smoke(), split, student_input_spec(recipe))
    assert all(m.fused_attn for m in default.model.modules() if hasattr(m, "fused_attn"))
    model = build_student(recipe.student, 4).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)
        assert set_attention(model, "manual") == recipe.student.depth
        manual = model(x)
    assert torch.allclose(fused, manual, atol=1e-5)


# The recipe as it runs: teacher.model and a teacher folder ------------------------------------


def teacher_folder(tmp_path: Path, architecture: str) -> Path:
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 4}))
    return folder


def test_a_teacher_folder_holding_another_model_than_the_recipe_names_is_refused(tmp_path: Path) -> None:
    folder = teacher_folder(tmp_path, "resnet18")
    with pytest.raises(RecipeError) as info:
        resolve_teacher_model(smoke(f"teacher.checkpoint={folder}", "teacher.model=resnet10t"))
    assert str(info.value) == (
        f"teacher.model is resnet10t but the teacher.checkpoint folder {folder} holds a resnet18; set "
        "teacher.model=resnet18, or teacher.model=null to take the folder's"
    )


def test_teacher_model_null_beside_an_ensemble_is_left_to_the_members() -> None:
    recipe = smoke("teacher.model=null", "teacher.ensemble=[{model: resnet10t}, {model: resnet18}]")
    assert resolve_teacher_model(recipe) is recipe


def test_teacher_model_null_takes_the_folders_and_the_run_records_it(tmp_path: Path) -> None:
    folder = teacher_folder(tmp_path, "resnet18")
    recipe = smoke(f"teacher.checkpoint={folder}", "teacher.model=null", f"run.output_dir={tmp_path}")
    assert resolve_teacher_model(recipe).teacher.model == "resnet18"
    run = DistillRun(recipe, accelerator=Accelerator(cpu=True))
    assert run.recipe.teacher.model == "resnet18"  # what recipe.yaml and the model card record
    run.rundir.prepare(run.accelerator, run.recipe, [])
    assert yaml.safe_load(run.rundir.recipe_file.read_text())["teacher"]["model"] == "resnet18"
    same = smoke(f"teacher.checkpoint={folder}", "teacher.model=resnet18")
    assert resolve_teacher_model(same) is same


def test_teacher_model_null_needs_a_folder(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(
        RecipeError, match=re.escape(f"teacher.checkpoint {weights} is a weights file; set teacher.model")
    ):
        resolve_teacher_model(smoke(f"teacher.checkpoint={weights}", "teacher.model=null"))
    with pytest.raises(RecipeError, match=re.escape("but teacher.train; set teacher.model")):
        resolve_teacher_model(smoke("teacher.model=null"))


# The closing table and the launcher's threads -------------------------------------------------


def test_the_closing_table_starts_every_value_in_one_column() -> None:
    summary = RunSummary(
        run="runs/smoke",
        final={"val/top1_cls": 0.9, "val/top1_dist": 0.6, "val/top1_fused": 0.65, "val/top5_fused": 1.0,
               "val/teacher_top1": 1.0, "val/agreement": 0.65},
        wall_time_s=15.25, data={}, best={"val/top1_fused": 0.65, "epoch": 1}, epochs=2, steps=16,
        throughput_train_img_s=61.6,
    )  # fmt: skip
    lines = summary_lines(summary)
    values = [line[26:] for line in lines]
    assert values[:8] == ["90.00%", "60.00%", "65.00%", "100.00%", "100.00%", "65.00%", "65.00% (epoch 1)", "2 / 16"]
    assert all(line[24:26] == "  " and line[26] != " " for line in lines)
    assert sum("teacher" in line for line in lines) == 2  # its accuracy, and the agreement with it


def test_launch_shares_the_physical_cores_when_no_thread_count_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.commands.launch import launch_command_parser

    from distill.launch import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parse = launch_command_parser().parse_args
    assert default_threads(parse(["--num_processes", "2", "--num_machines", "1", "x.py"]), 16) == 8
    assert default_threads(parse(["--num_processes", "1", "--num_machines", "1", "x.py"]), 16) == 16
    given = ["--num_cpu_threads_per_process", "3", "--num_processes", "2", "--num_machines", "1", "x.py"]
    assert default_threads(parse(given), 16) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert default_threads(parse(["--num_processes", "2", "--num_machines", "1", "x.py"]), 16) is None
