"""Look inside a student: the ViT and DeiT papers' analyses in one command.

    python -m distill.analyze MODEL [--images N|all] [--out DIR] [--data RECIPE.yaml | IMAGE_ROOT]
                              [--checkpoint last|best|PATH] [--ema] [--maps N] [--device cpu|cuda]

MODEL is a run directory (its newest checkpoint, or --checkpoint), a checkpoint directory or an
export folder (which needs --data and has no teacher). Writes analysis.json, analysis.md and
PNG figures to --out (default: <run>/analysis, or <export>-analysis beside an export): mean
attention distance per layer and head, position-embedding similarity, class/distillation token
similarity per layer, disagreement between ground truth, the teacher and each head, and the
prefix tokens' attention maps. distill/analysis.py has the maths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
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
    parser.add_argument("--data", default=None, help="recipe YAML or image-folder root (default: the run's data)")
    parser.add_argument("--checkpoint", default="last", help="for a run: last, best or a checkpoint path")
    parser.add_argument("--ema", action="store_true", help="analyse the EMA weights of the checkpoint")
    parser.add_argument("--maps", type=int, default=6, help="images whose attention maps are drawn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    def go() -> None:
        import torch

        from distill.analysis import core as analysis
        from distill.exports.artifacts import load_artifact

        model = Path(args.model)
        if not model.exists():
            raise DistillError(f"{model} does not exist; give a run directory, a checkpoint or an export folder")
        if args.images is not None and args.images < 1:
            raise analysis.AnalysisError(f"--images must be at least 1 (or 'all'), got {args.images}")
        loaded = load_artifact(model, args.checkpoint, args.ema)
        analysis.attention_modules(loaded.model)  # a convnet stops before the data is loaded
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        data = analysis.analysis_data(args.data, loaded)
        teacher, note = analysis.run_teacher(loaded, data, device)
        out = Path(args.out) if args.out else default_out(loaded, model, args.checkpoint, args.ema)
        result = analysis.analyze(
            loaded, data, out, args.images, args.maps, args.batch_size, device, teacher, note, source=model
        )
        print(analysis.attention_sentence(result["attention_distance"]))
        summary = analysis.analysis_summary(result)
        if summary["token_cosine"] is not None:
            layers = ", ".join(f"{k} {v:.2f}" for k, v in summary["token_cosine"].items())
            print(f"class/distillation token cosine: learned {summary['learned_token_cosine']:.2f}, {layers} "
                  "(DeiT-B: 0.06 -> 0.93)")  # fmt: skip
        print(analysis.disagreement_sentence(result["disagreement"], result["data"]["images"]))
        print(f"wrote {out / 'analysis.md'} in {result['seconds']['total']:.1f} s")

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
