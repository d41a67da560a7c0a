"""Look inside a student: the ViT and DeiT papers' analyses in one command.

    python -m distill.analyze MODEL [--images N|all] [--out DIR] [--data RECIPE.yaml | IMAGE_FOLDER]
                              [--checkpoint last|best|PATH] [--ema] [--maps N] [--device cpu|cuda]

MODEL is a run directory (its newest checkpoint, or --checkpoint), a checkpoint directory or an
export folder (which needs --data and has no teacher). IMAGE_FOLDER is a root with ``train/``
(and ``val/`` or ``test/``) or one split folder of ``<class>/<image>`` folders, read as
``python -m distill.evaluate`` reads it. Writes analysis.json, analysis.md and PNG figures to
--out (default: <run>/analysis, or <export>-analysis beside an export): mean attention distance
per layer and head, position-embedding similarity, class/distillation token similarity per
layer, disagreement between ground truth, the teacher and each head, and the prefix tokens'
attention maps. distill/analysis/ has the maths (maths.py) and the file format (record.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.analysis.record import AnalysisRecord
    from distill.exports.artifacts import LoadedModel


def parse_images(value: str) -> int | None:
    """``all`` -> None; otherwise a count (checked by the analysis, so 0 gets its message)."""
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {value!r}") from None


def default_out(loaded: LoadedModel, model: Path, checkpoint: str, ema: bool) -> Path:
    """<run>/analysis for a run's last checkpoint, <run>/analysis-<checkpoint>[-ema] for another,
    <export>-analysis beside an export (an export folder holds the Hub files only)."""
    if loaded.run_dir is None or loaded.checkpoint is None:
        return model.resolve().with_name(model.resolve().name + "-analysis")
    last = checkpoint == "last" and model.resolve() == Path(loaded.run_dir).resolve()
    name = "analysis" if last else f"analysis-{loaded.checkpoint.name}"
    return Path(loaded.run_dir) / (name + ("-ema" if ema else ""))


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory, checkpoint directory or export folder")
    parser.add_argument("--images", type=parse_images, default=512, help="validation images to analyse, or 'all'")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/analysis)")
    parser.add_argument(
        "--data", default=None, help="recipe YAML, image-folder root or one split folder (default: the run's data)"
    )
    parser.add_argument("--checkpoint", default="last", help="for a run: last, best or a checkpoint path")
    parser.add_argument("--ema", action="store_true", help="analyse the EMA weights of the checkpoint")
    parser.add_argument("--maps", type=int, default=6, help="images whose attention maps are drawn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    args = parser.parse_args(argv)
    return run_guarded(lambda: analyze(args))


def analyze(args: argparse.Namespace) -> None:
    import torch

    from distill.analysis.collect import attention_modules
    from distill.analysis.inputs import analysis_data, run_teacher
    from distill.analysis.record import AnalysisError
    from distill.analysis.runner import AnalysisOptions, default_device
    from distill.analysis.runner import analyze as analyze_model
    from distill.exports.artifacts import load_artifact

    if args.device == "cuda" and not torch.cuda.is_available():
        raise DistillError("--device cuda but torch sees no GPU; pass --device cpu or leave --device out")
    model = Path(args.model)
    if not model.exists():
        raise DistillError(f"{model} does not exist; give a run directory, a checkpoint or an export folder")
    if args.images is not None and args.images < 1:
        raise AnalysisError(f"--images must be at least 1 (or 'all'), got {args.images}")
    loaded = load_artifact(model, args.checkpoint, args.ema)
    attention_modules(loaded.model)  # a convnet stops before the data is loaded
    device = torch.device(args.device) if args.device else default_device()
    data = analysis_data(args.data, loaded)
    teacher, note = run_teacher(loaded, data, device)
    out = Path(args.out) if args.out else default_out(loaded, model, args.checkpoint, args.ema)
    options = AnalysisOptions(args.images, args.maps, args.batch_size, device)
    print_findings(analyze_model(loaded, data, out, options, teacher, note, source=model), out)


def print_findings(record: AnalysisRecord, out: Path) -> None:
    """The headline of each analysis; the rest is in analysis.md."""
    from distill.analysis.markdown import attention_sentence, disagreement_sentence
    from distill.analysis.record import TokenSimilarity

    print(attention_sentence(record.attention_distance))
    tok = record.token_similarity
    if isinstance(tok, TokenSimilarity):
        layers = ", ".join(f"{k} {v:.2f}" for k, v in zip(tok.layers, tok.cosine))
        print(f"class/distillation token cosine: learned {tok.learned_tokens:.2f}, {layers} (DeiT-B: 0.06 -> 0.93)")
    print(disagreement_sentence(record.disagreement, record.data.images))
    print(f"wrote {out / 'analysis.md'} in {record.seconds.total:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
