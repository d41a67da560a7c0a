"""The bench's result as text: the header, one table row per configuration, the two ratios."""

from __future__ import annotations

from typing import Any

TEACHER_LEGEND = "teacher: IM torch.inference_mode, NG torch.no_grad, CL channels-last input and weights, C compiled"
COLUMNS = ("configuration", "prec", "attn", "optimizer", "teacher", "img/s", "min-max", "step ms", "peak MB")
COLUMNS += ("opt MB", "GFLOP/s", "% peak")
FIRST_NUMBER = COLUMNS.index("img/s")


def format_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    ratios = result["ratios"]
    tail = [
        TEACHER_LEGEND,
        f"peak MB: steady-state step memory, {result['memory']}; opt MB: optimizer state",
        "GFLOP/step: "
        + ", ".join(f"{r['key']} {r['gflop_per_step']:.2f}" for r in result["configurations"])
        + " (torch.utils.flop_counter)",
        _ratio_line("identical settings (ours fp32 non-fused vs reference fp32)", ratios["identical_settings"]),
        _ratio_line(
            f"fast path (ours {s['fast_precision']} {s['fast_attention']} attention, fused AdamW"
            f"{', compiled' if s['compile'] else ''} vs reference fp32)",
            ratios["fast_path"],
        ),
        *_loading_lines(result.get("data_loading")),
        *[f"note: {n}" for n in result["notes"]],
    ]
    return "\n".join([*_head(result), "", *_table(result["configurations"]), "", *tail])


def _head(result: dict[str, Any]) -> list[str]:
    s, dev, v = result["settings"], result["device"], result["versions"]
    st = s["student"]
    return [
        f"distill.bench  {result['date']}  torch {v.get('torch')}  timm {v.get('timm')}",
        f"device: {dev['type']} {dev['name']}, {dev['threads']} threads",
        f"student {st['model']} (img {s['input_size'][1]}, patch {st['patch_size']}, embed {st['embed_dim']}, "
        f"depth {st['depth']}, heads {st['num_heads']}, {st['params'] / 1e6:.2f}M params)  teacher "
        f"{s['teacher']['model']} ({s['teacher']['params'] / 1e6:.2f}M)  classes {s['num_classes']}  "
        f"batch {s['batch_size']}  kd {s['distillation']['type']}",
        f"{s['warmup']} warm-up + {s['steps']} timed steps x {s['repeats']} alternating repetitions; {s['data']}",
        "matmul peak (measured): "
        + ", ".join(f"{k} {val:.0f} GFLOP/s" for k, val in result["matmul_peak_gflops"].items())
        + f" (torch.mm {result['matmul_peak_size']}^2, best of {len(result['matmul_peak_samples']['fp32'])})",
        f"fast path: {s['fast_choice']['settings']} ({s['fast_precision_reason']})",
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    table = [COLUMNS]
    for r in rows:
        img = r["img_s"]
        table.append(
            (
                r["label"] + (" [compiled]" if r["compile"] else ""),
                r["precision"],
                r["attention"] if r["implementation"] == "distill" else "fused",  # timm's default
                r["optimizer"],
                r["teacher"],
                f"{img['median']:.1f}",
                f"{img['min']:.1f}-{img['max']:.1f}",
                f"{r['step_ms']['median']:.1f}",
                _mb(r["peak_memory_mb"]),
                _mb(r["optimizer_state_mb"]),
                f"{r['achieved_gflops']:.1f}",
                f"{100 * r['fraction_of_peak']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(c.rjust(w) if i >= FIRST_NUMBER else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _loading_lines(loading: dict[str, Any] | None) -> list[str]:
    if loading is None:
        return []
    return [
        f"data loading (data.store={loading['store']}, {loading['num_workers']} workers, batch "
        f"{loading['batch_size']}, {loading['batches']} batches, measured alone): {loading['img_s']:.0f} img/s, "
        f"{loading['ratio_to_step']:.1f}x the {loading['compared_with']} step; keeps up: "
        f"{'yes' if loading['keeps_up'] else 'NO'}"
    ]


def _mb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _ratio_line(what: str, ratio: dict[str, Any]) -> str:
    return f"ratio, {what}: {ratio['value']:.3f}x (per repetition {ratio['paired_min']:.3f}-{ratio['paired_max']:.3f})"
