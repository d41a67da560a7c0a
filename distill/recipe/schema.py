"""Recipe schema, loading and dotted overrides.

A recipe is a YAML file validated against the locked schema below (big_vision style): an unknown
or misspelt key is an error naming its dotted path and the closest valid key, and values are
converted by the schema, never guessed (PyYAML reads ``3e-4`` as a string; the schema makes it
a float). Every default is declared once, here, with the reason for it: the ``#`` comment next
to the field (the line above or the same line), which docs/recipe-reference.md shows; after
changing a field or its comment, run ``python -m distill.recipe_doc > docs/recipe-reference.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from distill.errors import RecipeError
from distill.recipe.overrides import apply_override, format_errors, missing_recipe, parse_override


class Section(BaseModel):
    """A locked recipe section: unknown keys are errors, assignments are validated."""

    # coerce_numbers_to_str: `run.name=123` is a name, although YAML reads it as an int.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True
    )


# Accelerate's trackers (accelerate.utils.LoggerType, less 'all': a run logs where its recipe says,
# not wherever packages happen to be installed); tests/test_trackers.py checks the list against it.
TrackerName = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]


class RunConfig(Section):
    name: str = "run"  # the run directory is <output_dir>/<name>
    output_dir: Path = Path("runs")  # holds the run directories and, by default, the caches
    seed: int = 0  # init and drop-path; also the data stream unless data.seed is set (pipeline.data_seed)
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the newest complete checkpoint
    overwrite: bool = False  # a finished run is never replaced unless this is true
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint at epoch ends only
    keep_checkpoints: int = Field(2, ge=1)  # newest K kept; 'best' is kept on top of these
    log_every_steps: int = Field(10, ge=1)  # train scalars to every tracker; the finite-loss check
    # Where the scalars go besides metrics.jsonl (run/tracking.py). tensorboard writes <run>/tb
    # and needs nothing more; each other tracker needs its package (pip install 'distill[mlflow]'
    # and so on) and is configured by its own environment variables (MLFLOW_TRACKING_URI, ...).
    trackers: list[TrackerName] = ["tensorboard"]
    # Off a terminal (a log file), a progress line at least this often, and one per epoch; on a
    # terminal, a progress bar.
    progress_every_s: float = Field(30.0, gt=0.0)
    export: bool = True  # write export/ (timm Hub layout) at the end
    # Stop after the teacher stage: train (or find) and evaluate the teacher, copy it to
    # <run>/teacher/ (a timm Hub folder that teacher.checkpoint can point at), no student.
    teacher_only: bool = False
    # How long a process waits in a collective (a barrier, a broadcast) before the launch fails.
    # torch's default is 10 minutes under NCCL (30 under gloo), while the main process alone loads
    # and checks the data (data.on_bad_image=skip decodes every image) and, in compare, writes the
    # analyses and the report: the other processes wait for it at the next barrier.
    process_group_timeout_min: float = Field(60.0, gt=0.0)

    @field_validator("trackers", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # run.trackers=mlflow: a list of one

    @field_validator("trackers")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a tracker twice: {value}")
        return value


class SyntheticConfig(Section):
    """Generated class-dependent images, for tests and smoke runs (no files needed)."""

    num_classes: int = Field(4, ge=2)
    train_per_class: int = Field(32, ge=1)
    val_per_class: int = Field(8, ge=1)
    image_size: int = Field(16, ge=4)  # pixels per side
    noise: float = Field(25.0, ge=0.0)  # pixel noise std (0-255 scale): higher is harder


class AugmentConfig(Section):
    """Training augmentation (timm's create_transform + Mixup). Defaults are DeiT's (Table 9)."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)  # RandomResizedCrop aspect-ratio range
    hflip: float = Field(0.5, ge=0.0, le=1.0)  # probability of a horizontal flip
    color_jitter: float = Field(0.3, ge=0.0)  # ignored by timm when auto_augment is set
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment 9/0.5
    re_prob: float = Field(0.25, ge=0.0, le=1.0)  # random erasing, 'pixel' mode
    mixup: float = Field(0.8, ge=0.0)  # Beta alpha; 0 disables
    cutmix: float = Field(1.0, ge=0.0)  # Beta alpha; 0 disables
    mixup_prob: float = Field(1.0, ge=0.0, le=1.0)  # probability that a batch is mixed at all
    mixup_switch_prob: float = Field(0.5, ge=0.0, le=1.0)  # both on: probability of cutmix, not mixup
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)  # eval crop; None: the student's cfg
    interpolation: str | None = None  # None: the student's cfg (bicubic for DeiT)


class DataConfig(Section):
    # digits: scikit-learn's bundled 8x8 digits; hub: a Hugging Face dataset; synthetic: below;
    # shards: the folder `python -m distill.shard` wrote from any of these (docs/scale.md).
    source: Literal["digits", "imagefolder", "hub", "synthetic", "shards"] = "digits"
    # imagefolder: a directory; hub: a dataset name; shards: a directory (or its manifest.json),
    # or for shard_access=stream a URL (s3://, gs://, hf://, https://, ...) or pipe:COMMAND {}
    path: str | None = None
    hub_config: str | None = None  # hub: the dataset's configuration name
    train_split: str = "train"  # imagefolder: the sub-folder; hub: the split name
    val_split: str | None = None  # None: 'validation', 'val' or 'test' if present, else held out
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # held-out share when the source has no val
    split_seed: int = 0  # fixed apart from run.seed so every seed is scored on the same images
    max_train_samples: int | None = Field(None, ge=1)  # a seeded stratified subset, for quick runs
    max_val_samples: int | None = Field(None, ge=1)  # a seeded stratified subset of val
    num_workers: int = Field(0, ge=0)  # per process; augmentation stays a function of (seed,e,i)
    # The data stream's seed (order, augmentation, mixup/cutmix); None: run.seed. Fixing it makes
    # runs with different run.seed differ only in the model's randomness (init, drop-path), so
    # their teacher outputs are the same and teacher.output_cache can share them.
    seed: int | None = None
    # Repeated augmentation (Hoffer et al. 2020; DeiT trains with 3): each global batch holds N
    # differently augmented views of the same images, and an epoch covers len(train) / N distinct
    # images, as DeiT's RASampler does. 1 is off. The views of an image go to different processes
    # (and accumulation micro-steps) when there are at least N of those, as in DeiT, so mixup and
    # cutmix never mix an image with another view of itself; with fewer, a process's batch holds
    # ceil(N / shares) views at most. A global batch that is not a multiple of N holds
    # ceil(batch / N) images and leaves out the last views of its last images. Repeat 0 of an
    # image is the view it gets without repetition; repeat r of image i in epoch e is a function
    # of (data seed, e, i, r).
    repeated_aug: int = Field(1, ge=1)
    # 'tensor': decode every image once into a uint8 tensor and augment whole batches as tensors
    # (timm's random resized crop with Pillow's filter, and flip; on the GPU when there is one),
    # in the teacher stage and the student's. For small images only; it cannot do RandAugment,
    # colour jitter or random erasing. 'decode': timm's PIL pipeline per image. 'auto' (default):
    # tensor when it can (images of at most 64 px, crop/flip augmentation), else decode.
    # Measured on 2 CPU cores (quickstart, digits): 988 vs 589 student img/s; CIFAR-10 batches
    # of 128 cost 3.6 ms against 119 ms through PIL.
    store: Literal["auto", "decode", "tensor"] = "auto"
    # A corrupt or truncated image: 'error' stops at the first one, naming the file; 'skip' opens
    # every image when the data loads and drops the bad ones (counted and listed).
    # `python -m distill.scan RECIPE` lists them all without training.
    on_bad_image: Literal["error", "skip"] = "error"
    # shards: hash every shard (sha256) when the data loads, against its manifest. Size, image
    # count and labels per class are always checked; the hash reads every byte (ImageNet: ~140 GB
    # per process), so it is off by default. distill.shard hashes each shard as it writes it.
    verify_shards: bool = False
    # shards: 'random' reads rows memory-mapped in the sampler's order (every guarantee of the
    # source). 'stream' reads each shard front to back, in a shard order drawn from (data seed,
    # epoch), through a shuffle buffer, each process and loader worker its own shards. Kept: the
    # view of image i in epoch e is a function of (data seed, e, i); the same seed, processes,
    # data.num_workers and batch give the same stream; exact resume (with the same processes and
    # workers: another count is refused). Given up: random mode's order (and metrics), P
    # processes = 1, each image once per epoch unless shards divide evenly, the teacher-output
    # cache (refused). It alone reads data.path as a URL: the training split front to back, the
    # validation split fetched once into $DISTILL_CACHE (default ~/.cache/distill). docs/scale.md.
    shard_access: Literal["random", "stream"] = "random"
    stream_buffer: int = Field(1000, ge=1)  # stream: images held by each shard's shuffle buffer
    synthetic: SyntheticConfig = SyntheticConfig()
    augment: AugmentConfig = AugmentConfig()


class OptimConfig(Section):
    """Optimisation settings shared by the student run and the teacher stage."""

    epochs: int = Field(300, ge=1)
    batch_size: int = Field(1024, ge=1)  # GLOBAL batch: all processes x accumulation steps
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step, within batch_size
    opt: Literal["adamw", "sgd", "lamb", "adam"] = "adamw"  # timm.optim.create_optimizer_v2
    # torch's fused Adam(W) kernel (CPU and GPU): the quickstart's optimizer step went from
    # 6.3 ms to 2.3 ms on 2 CPU cores (measured), 7.5% of the whole training step.
    fused: bool = True
    lr: float = Field(5e-4, gt=0.0)  # before lr_scale_batch
    lr_scale_batch: bool = True  # DeiT: lr x global_batch / 512
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    weight_decay: float = Field(0.05, ge=0.0)  # never on tokens, pos-embed, biases, norms (timm)
    sched: Literal["cosine", "step", "constant"] = "cosine"  # timm create_scheduler_v2
    # Linear warm-up from warmup_lr to the peak lr (timm). A run of epochs <= warmup_epochs never
    # leaves it (its lr ends below the peak and never decays): it trains, with a warning line at
    # its start that the run also records.
    warmup_epochs: float = Field(5.0, ge=0.0)
    warmup_lr: float = Field(1e-6, ge=0.0)  # the lr warmup starts from (no effect without warm-up)
    min_lr: float = Field(1e-5, ge=0.0)  # the schedule's floor
    clip_grad: float | None = Field(None, gt=0.0)  # DeiT: no clipping
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # labels only, never teacher targets


class TrainConfig(OptimConfig):
    # One precision per launch (Accelerate fixes it at start-up); the teacher stage uses it too.
    # bf16 autocast: fast on GPUs and on CPUs with AMX or avx512_bf16; elsewhere it is emulated
    # (this project's 2-core avx512f machines: a whole step 3x slower than fp32, measured by
    # python -m distill.bench). On a CPU, train.attention=auto pairs bf16 with timm's manual
    # attention (the CPU flash-attention kernel is slow in bf16). fp16: GPU only.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # None: no EMA (DeiT never used it)
    # torch.compile the student's forward (Inductor). Off by default: compiling costs tens of
    # seconds per run, which only pays off on long runs (figures: python -m distill.bench).
    compile: bool = False
    # The student's attention: 'fused' is F.scaled_dot_product_attention (torch picks the kernel),
    # 'manual' timm's softmax(q k^T) v in plain matrix products (fused_attn=False), 'auto' manual
    # on a CPU under bf16/fp16 autocast and fused otherwise (the run logs its choice). On a CPU
    # with bf16, torch's flash kernel is the bottleneck: measured on AMD EPYC (avx512_bf16) with
    # recipes/cifar10_cpu.yaml's step, bf16 449 img/s fused against 893 manual (fp32: 460 fused,
    # 441 manual); python -m distill.profile_step shows where the time goes, python -m
    # distill.bench times every choice on the machine at hand.
    attention: Literal["auto", "fused", "manual"] = "auto"
    # TF32 matrix products and convolutions on NVIDIA GPUs (10-bit mantissa inputs: faster, less
    # exact). Decided here for the whole process, since Accelerate turns TF32 matmuls on by itself
    # when train.compile is on in fp32; no effect on a CPU.
    tf32: bool = False

    def attention_on(self, device_type: str) -> Literal["fused", "manual"]:
        """train.attention resolved for a device: 'auto' takes 'manual' on a CPU under bf16/fp16
        autocast (the bench's figures above: 1.8x fp32's throughput, 2x bf16 fused) and 'fused'
        otherwise (fp32 on a CPU: 460 fused against 441 manual; GPUs run the fused kernels)."""
        if self.attention != "auto":
            return self.attention
        return "manual" if device_type == "cpu" and self.precision != "fp32" else "fused"


class TeacherTrainConfig(OptimConfig):
    """How the pipeline trains the teacher when no checkpoint exists (cross-entropy)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    lr_scale_batch: bool = False
    warmup_epochs: float = Field(1.0, ge=0.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)  # the teacher's stochastic depth while it trains
    # Fixed apart from run.seed: runs with different seeds share one trained teacher.
    seed: int = 0


class OutputCacheConfig(Section):
    """Replay the teacher's logits instead of recomputing them (teacher_cache.py).

    The view of image i in epoch e is fixed by (data seed, e, i), so the teacher's output for it
    is too: runs that share the data seed, teacher and augmentation (a study's types and seeds
    with data.seed fixed) pay for the teacher once.
    """

    enabled: bool = False  # distill.compare switches it on for its runs (--no-teacher-cache: off)
    dir: Path | None = None  # None: <run.output_dir>/teacher_outputs
    # Full fp32 logits while an epoch's fit this budget (CIFAR-10: 50,000 x 10 x 4 B = 2 MB);
    # otherwise the top-k log-probabilities in fp16 (ImageNet, k=10: 51 MB per epoch).
    budget_mb: float = Field(64.0, gt=0.0)
    topk: int = Field(10, ge=1)  # k of the top-k encoding (see budget_mb)
    # Every N-th replayed step (and each epoch's first) is recomputed and compared: a cache that
    # no longer matches its key stops the run instead of silently training on stale targets.
    verify_every: int = Field(50, ge=0)


class TeacherMemberConfig(Section):
    """One member of ``teacher.ensemble``: a teacher entry as ``teacher`` itself takes, and its
    weight. A member with neither checkpoint nor train is trained with the recipe's teacher.train."""

    model: str | None = None  # a timm classifier; None: a checkpoint folder's recorded architecture
    checkpoint: Path | None = None  # a weights file or a timm folder, as teacher.checkpoint
    model_args: dict[str, Any] = {}  # extra timm.create_model keyword arguments
    mean: tuple[float, float, float] | None = None  # its input normalisation; None: its folder's, else timm's
    std: tuple[float, float, float] | None = None
    img_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None  # its own input size
    train: TeacherTrainConfig | None = None  # None (and no checkpoint): the recipe's teacher.train
    weight: float = 1.0  # its share of the combination (weights are divided by their sum)


class TeacherConfig(Section):
    # any timm convnet (DeiT used RegNetY-16GF); null: the architecture a teacher.checkpoint
    # folder records (a folder recording another than this one is refused).
    model: str | None = "regnety_160"
    checkpoint: Path | None = None  # safetensors or torch weights (weights_only), or a timm folder
    model_args: dict[str, Any] = {}  # extra timm.create_model keyword arguments
    mean: tuple[float, float, float] | None = None  # teacher's input normalisation; None: timm cfg
    std: tuple[float, float, float] | None = None  # with mean; None: timm cfg
    # The teacher's own input size (one side, or [height, width]): the student's batch is resized
    # to it inside the teacher, and a teacher the pipeline trains is trained at it. None: a
    # teacher folder's recorded size, else the student's (a bare weights file records none).
    img_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None
    min_top1: float | None = Field(None, ge=0.0, le=1.0)  # None: stop below 1.5 x chance
    train: TeacherTrainConfig | None = None  # train the teacher when no checkpoint is given
    cache_dir: Path | None = None  # trained teachers; None: <run.output_dir>/teachers
    # Fast path (python -m distill.bench measures each): no autograd bookkeeping at all, the
    # channels-last layout convolutions prefer, and optionally torch.compile.
    inference_mode: bool = True
    channels_last: bool = True  # the channels-last memory layout
    compile: bool = False  # torch.compile the teacher's forward
    output_cache: OutputCacheConfig = OutputCacheConfig()
    # Several teachers as one (distill/models/ensemble.py, docs/teachers.md): each member runs at
    # its own size and normalisation on the same (mixed) student batch. With w_m = weight_m /
    # sum(weights), combine 'probs' gives the teacher logits tau * log(sum_m w_m softmax(z_m / tau)),
    # whose softmax at the distillation tau is exactly the members' weighted mean softmax (soft
    # targets) and whose argmax is that mixture's (hard); 'logits' gives sum_m w_m z_m. When set,
    # teacher.checkpoint must be unset; teacher.train trains the members that name no weights.
    ensemble: list[TeacherMemberConfig] | None = None
    combine: Literal["probs", "logits"] = "probs"

    @model_validator(mode="after")
    def _ensemble(self) -> TeacherConfig:
        if self.ensemble is None:
            return self
        if not self.ensemble:
            raise ValueError("teacher.ensemble is empty; list at least one member, or remove it for one teacher")
        weights = [m.weight for m in self.ensemble]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"teacher.ensemble weights {weights} must be >= 0 with a positive sum; give each member "
                "a weight >= 0 (they are divided by their sum)"
            )
        if self.checkpoint is not None:
            raise ValueError(
                "teacher.checkpoint and teacher.ensemble are both set; give each member its checkpoint "
                "in teacher.ensemble, or remove teacher.ensemble for one teacher"
            )
        return self


class StudentConfig(Section):
    model: str = "deit_tiny_distilled_patch16_224"  # a timm registry name
    # Input size: one side, or [height, width] for a non-square input; None keeps the registry
    # default (224). A fine-tune at another size resamples the position embeddings (student.init).
    img_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None
    patch_size: int | None = Field(None, ge=1)  # None: the registry model's
    embed_dim: int | None = Field(None, ge=1)  # None: the registry model's
    depth: int | None = Field(None, ge=1)  # None: the registry model's
    num_heads: int | None = Field(None, ge=1)  # None: the registry model's
    mlp_ratio: float | None = Field(None, gt=0.0)  # None: the registry model's
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)  # DeiT: stochastic depth 0.1
    # Hybrid student (the ViT paper's hybrid): a timm convnet whose feature map, after its first
    # stem_stages feature stages (timm features_only), is cut into patches for the transformer
    # instead of the raw pixels (timm's HybridEmbed); patch_size then counts feature-map cells
    # (default 1). E.g. resnet18 with 2 stages: a stride-4, 64-channel map.
    stem: str | None = None
    stem_stages: int = Field(2, ge=1)
    # Initial weights: a run directory, a checkpoint folder, a timm Hub folder (an export) or a
    # safetensors / torch weights file, distilled or plain ViT. A plain ViT gets a distillation
    # token, a position row and a distillation head (copies of the class token's); a distilled
    # one loses them for a plain student (distillation.token=false). Position embeddings are
    # resampled (2D bicubic) when the source's patch grid differs from this student's; a bare
    # weights file records no input size, so its grid is taken as square. A source with
    # parameters this student lacks (layer scale, q/k norms, register tokens) is refused.
    init: Path | None = None
    # Which weights of a run directory: its final student, the last or best checkpoint, or the
    # EMA weights of the last checkpoint. A run that has not finished has no final student.
    init_checkpoint: Literal["final", "last", "best", "ema"] = "final"
    # The heads of student.init: keep them, reset them to zero (the ViT paper's fine-tuning on a
    # new task), or auto: keep when the class count matches the data's, else reset.
    init_heads: Literal["keep", "reset", "auto"] = "auto"

    @model_validator(mode="after")
    def _divisible(self) -> StudentConfig:
        sizes = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        if sizes is not None and self.patch_size is not None and any(s % self.patch_size for s in sizes):
            raise ValueError(
                f"student.img_size {self.img_size} is not divisible by student.patch_size "
                f"{self.patch_size}; pick sizes such that img_size % patch_size == 0"
            )
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"student.embed_dim {self.embed_dim} is not divisible by student.num_heads {self.num_heads}"
            )
        return self


class DistillationConfig(Section):
    type: Literal["none", "soft", "hard"] = "hard"  # hard won in DeiT Table 3
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the teacher term
    tau: float = Field(1.0, gt=0.0)  # soft only; DeiT code default 1.0 (paper: 3.0)
    # Soft KL normalisation: 'batchmean' divides the summed KL by the batch (timm, textbook);
    # 'deit' by batch x classes, as DeiT's losses.py does (deit issue #61): C times smaller.
    kl_norm: Literal["batchmean", "deit"] = "batchmean"
    # False: no distillation token. The student is the plain ViT of the same size (the name
    # without '_distilled') and both terms act on its class head: DeiT Table 3's "usual" and
    # "hard distillation" rows, and with type=none its "no distillation" row.
    token: bool = True


class EvalConfig(Section):
    batch_size: int = Field(256, ge=1)  # global
    every_epochs: int = Field(1, ge=1)  # the last epoch is always evaluated


class Recipe(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distillation: DistillationConfig = DistillationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.data.source in ("imagefolder", "hub", "shards") and not self.data.path:
            raise ValueError(
                f"data.path is required for data.source={self.data.source} "
                "(a directory for imagefolder and shards, a dataset name for hub)"
            )
        stream = self.data.shard_access == "stream"
        for wrong, why in (
            (
                stream and self.data.source != "shards",
                f"reads shards, not data.source={self.data.source}: set data.source=shards",
            ),
            (stream and self.data.store == "tensor", "decodes per image: set data.store=decode or auto"),
            (stream and self.teacher.output_cache.enabled, "cannot use teacher.output_cache: " + STREAM_NO_CACHE),
        ):
            if wrong:
                raise ValueError(f"data.shard_access=stream {why}")
        return self


STREAM_NO_CACHE = (  # teacher_outputs.py keys rows by (micro-step, rank, row); num_workers is not in its key
    "it keys outputs by place in the stream, which here depends on the processes and loader workers; set "
    "teacher.output_cache.enabled=false (distill.compare: --no-teacher-cache) or data.shard_access=random"
)

# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages

PROVENANCE_KEY = "provenance"  # written next to the recipe in a run's recipe.yaml; ignored here


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or start from defaults), apply ``a.b=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise RecipeError(missing_recipe(p, overrides))
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {p} must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
        tree.pop(PROVENANCE_KEY, None)
    for text in overrides:
        parts, value = parse_override(text, Recipe)
        apply_override(tree, parts, value, text, Recipe)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_errors(err, source, Recipe)) from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain YAML-able types (paths as strings, tuples as lists)."""
    return recipe.model_dump(mode="json")


class _RecipeDumper(yaml.SafeDumper):
    """SafeDumper that writes a list of plain values on one line (``scale: [0.08, 1.0]``), as the
    recipes do."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flow = all(not isinstance(v, (dict, list)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)


def resolved_recipe_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML in the schema's order, that load_recipe
    reads back to an equal Recipe (``python -m distill.train RECIPE --print-recipe``). Absent
    optional sections stay null (``teacher.train: null``)."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b': v}, values made TensorBoard-safe (None -> 'None', lists -> str)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
