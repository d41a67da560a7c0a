"""Write a recipe's data as shards that ``data.source=shards`` reads on any number of nodes.

    python -m distill.shard RECIPE.yaml --out DIR [--shard-size N] [--shuffle SEED] [--overwrite] [a.b=value ...]

Then train with ``data.source=shards data.path=DIR`` and otherwise the same recipe: the same
images in the same order with the same class names (docs/scale.md). Run the same command again
after an interruption: it keeps the shards already written whose sha256 matches and writes the
rest. Exit status 0 when the shard set is complete, 2 on a bad recipe, source or --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-shard", description="Write a recipe's data as shards.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as for training (data.path=...)")
    parser.add_argument("--out", required=True, type=Path, help="the shard folder (empty, or one to resume)")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard (default 5000)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shard set already in --out")
    parser.add_argument("--shuffle", type=int, metavar="SEED", help="write in an order drawn from SEED (stream mode)")
    parser.add_argument("--threads", type=int, default=8, help="parallel image-file reads (default 8)")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    args = parser.parse_args(argv)

    def go() -> None:
        from distill.data.shard_writer import ShardEvent, ShardOptions, write_shards
        from distill.exports.progress import duration
        from distill.recipe.schema import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        options = ShardOptions(args.out, args.shard_size, args.overwrite, args.threads, args.shuffle)
        last = [time.perf_counter() - args.progress_every]

        def report(event: ShardEvent) -> None:
            now = time.perf_counter()
            if now - last[0] < args.progress_every and event.images_done < event.images_total:
                return
            last[0] = now
            rate = event.images_done / max(event.elapsed_s, 1e-9)
            left = (event.images_total - event.images_done) / rate if rate > 0 else float("inf")
            what = "kept" if event.kept else "written"
            print(
                f"{event.record.file} {what}: {event.images_done:,}/{event.images_total:,} images, "
                f"{rate:,.0f} img/s, {duration(event.elapsed_s)} spent, {duration(left)} left",
                flush=True,
            )

        manifest = write_shards(recipe.data, options, report)
        for name, split in manifest.splits.items():
            size = sum(r.bytes or 0 for r in split.shards)
            print(f"{name}: {split.count:,} images in {len(split.shards)} shards ({size / 2**20:,.1f} MiB)")
        print(f"wrote {args.out}; train with: data.source=shards data.path={args.out}")

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
