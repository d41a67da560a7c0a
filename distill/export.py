"""Export a student from a run's checkpoint: formats, head choice, checks, int8.

The command: parse arguments, call distill.exports.export.run_export, print what it measured.
distill.exports.export documents the method.
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.exports.card import speed_words
from distill.exports.check_record import ExportCheck
from distill.exports.export import ExportOptions, parse_formats, resolve_formats, run_export
from distill.exports.formats import HEADS
from distill.exports.int8 import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MAX_TOP1_DROP


def main(argv: list[str] | None = None) -> int:
    import argparse

    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-export", description="Export a student from a run's checkpoint.")
    parser.add_argument("run", help="run directory")
    parser.add_argument("--checkpoint", default="last", help="last (default), best, or a checkpoint directory")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--head", choices=HEADS, default="fused", type=str.lower)
    parser.add_argument(
        "--format", default="timm",
        help="comma-separated: timm (always), onnx, onnx-int8 (adds onnx), torchscript, transformers",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it already holds files")
    parser.add_argument(
        "--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
        help="onnx-int8: training images (a seeded sample) that set the activation ranges (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP,
        help="onnx-int8: fail when top-1 drops more than this many points below fp32 (default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    def go() -> None:
        formats = parse_formats(args.format)
        resolve_formats(formats)  # an unknown name stops here, before the folder is looked at
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            # The folder is replaced as a whole (atomically): other formats or files in it would go.
            held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
            raise DistillError(
                f"--out {out} already holds files ({held}); choose an empty or new folder, or pass "
                "--overwrite to replace it with this export"
            )
        opts = ExportOptions(
            Path(args.run), out, tuple(formats), args.checkpoint, args.ema, args.head, args.calibration_images,
            args.max_top1_drop,
        )  # fmt: skip
        print(summary_text(run_export(opts), out))

    return run_guarded(go)


def summary_text(check: ExportCheck, out: Path) -> str:
    r = check.revalidation
    lines = [
        f"{name:12s} max |diff| {c.max_abs_diff:.2e}  {'ok' if c.ok else 'FAILED'}  "
        f"re-validated top-1 {100 * r.formats[name]:.2f}%"
        for name, c in check.formats.items()
    ]
    lines.append(f"student top-1 {100 * r.student_top1:.2f}% on {r.split}")
    for name, q in check.int8.items():
        t = q.kept
        lat = ", ".join(f"batch {b}: {speed_words(v.ratio)}" for b, v in q.latency_ms.items())
        lines.append(
            f"{name:12s} top-1 {100 * t.int8:.2f}% (fp32 {100 * t.fp32:.2f}%, drop {t.drop_points:.2f} points)  "
            f"agreement {100 * q.agreement_with_fp32:.2f}%  size {q.size_ratio:.2f}x  latency {lat or 'not measured'}"
        )
    lines.append(f"exported to {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.exit(main())
