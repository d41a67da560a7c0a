"""The study report's plots: validation top-1 against epoch, final top-1 per head, and the
training loss parts, each variant or cell a colour, mean over seeds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.study.runs import RunRecord
from distill.study.stats import mean_std

HEADS = ("cls", "dist", "fused")


def _series(runs: list[RunRecord], key: str) -> tuple[list[int], list[list[float]]]:
    epochs = sorted({m["epoch"] for r in runs for m in r.metrics})
    per_run = []
    for r in runs:
        by_epoch = {m["epoch"]: m.get(key) for m in r.metrics}
        per_run.append([by_epoch.get(e, math.nan) if by_epoch.get(e) is not None else math.nan for e in epochs])
    return epochs, per_run


def curve_figure(groups: dict[str, list[RunRecord]], key: str, ylabel: str, scale: float = 100.0) -> Any:
    """``key`` against epoch (a matplotlib Figure): mean over seeds, band from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, runs in groups.items():
        epochs, per_run = _series(runs, key)
        arr = scale * np.array(per_run, dtype=float)
        mean = np.nanmean(arr, axis=0)
        ax.plot(epochs, mean, label=f"{variant} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{ylabel} (mean over seeds, band: min to max)")
    fig.tight_layout()
    return fig


def plot_curves(groups: dict[str, list[RunRecord]], key: str, ylabel: str, path: Path, scale: float = 100.0) -> None:
    save(curve_figure(groups, key, ylabel, scale), path)


def save(fig: Any, path: Path) -> None:
    """Write a figure as PNG, its bounding box grown to hold every label, and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# Names longer than this are slanted under the bars, so that neighbours do not overlap.
LONG_LABEL = 8


def plot_bars(groups: dict[str, list[RunRecord]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(7.0, 2.0 + 0.8 * len(groups)), 4.5))
    width = 0.8 / len(HEADS)
    x = np.arange(len(groups))
    lows = []
    for i, head in enumerate(HEADS):
        stats = [mean_std([100 * r.final[f"val/top1_{head}"] for r in runs]) for runs in groups.values()]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        lows += [m - s for m, s in stats]
        ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=3, label=head)
    if any(len(name) > LONG_LABEL for name in groups):
        ax.set_xticks(x, list(groups), rotation=25, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(x, list(groups))
    bottom = max(0.0, math.floor(min(lows) - 5))
    # A cut axis exaggerates differences: say where it starts, on the axis itself.
    ax.set_ylabel("final val top-1 (%)" + (f", axis from {bottom:.0f}%" if bottom > 0 else ""))
    ax.set_ylim(bottom, 100)
    ax.legend(title="head")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("final top-1 per head (mean ± std over seeds)")
    fig.tight_layout()
    save(fig, path)


KL_NORM_NOTE = {"batchmean": "summed KL ÷ batch", "deit": "summed KL ÷ (batch × classes)"}


def _kl_norm(run: RunRecord) -> str:
    return str(run.recipe["distillation"].get("kl_norm", "batchmean"))


def _kd_panels(groups: dict[str, list[RunRecord]]) -> list[tuple[str, str, dict[str, list[RunRecord]]]]:
    """One panel per kind of teacher term, never two kinds on one y-scale.

    soft KD is tau^2 KL(teacher || dist head) (losses.soft_kd) and hard KD a cross-entropy against
    the teacher's argmax (losses.hard_kd); soft runs with different ``kl_norm`` differ by a factor
    of the class count, so they get panels of their own too. ``none`` has no teacher term.
    Returns (title, y-label, the variants' runs in that panel) per panel.
    """
    panels = []
    for kind in ("soft", "hard"):
        runs_of_kind = {v: rs for v, rs in groups.items() if rs[0].kind == kind}
        if not runs_of_kind:
            continue
        if kind == "hard":
            panels.append(("hard KD: CE(dist head, teacher argmax)", "cross-entropy (nats)", runs_of_kind))
            continue
        for norm in sorted({_kl_norm(r) for rs in runs_of_kind.values() for r in rs}):
            sub = {v: [r for r in rs if _kl_norm(r) == norm] for v, rs in runs_of_kind.items()}
            sub = {v: rs for v, rs in sub.items() if rs}
            taus = ", ".join(sorted({str(r.recipe["distillation"]["tau"]) for rs in sub.values() for r in rs}))
            title = f"soft KD: τ²·KL(teacher ‖ dist head)\nτ={taus}, kl_norm={norm} ({KL_NORM_NOTE.get(norm, norm)})"
            panels.append((title, "τ²·KL (nats)", sub))
    return panels


def loss_figure(groups: dict[str, list[RunRecord]]) -> Any:
    """The training-loss figure (a matplotlib Figure): total, label CE, then each teacher term on its own axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    colours = {v: f"C{i}" for i, v in enumerate(groups)}
    panels: list[tuple[str, str, str, dict[str, list[RunRecord]]]] = [
        ("train/loss", "total: (1-α)·CE + α·KD\n(none: CE only; KD differs by type)", "loss", groups),
        ("train/loss_ce", "CE(cls head, labels)\n(none: mean CE of both heads)", "cross-entropy (nats)", groups),
    ]
    panels += [("train/loss_kd", title, ylabel, sub) for title, ylabel, sub in _kd_panels(groups)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    for ax, (key, title, ylabel, sub) in zip(axes[0], panels, strict=True):
        for variant, runs in sub.items():
            epochs, per_run = _series(runs, key)
            ax.plot(epochs, np.nanmean(np.array(per_run, dtype=float), axis=0), label=variant, color=colours[variant])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    suptitle = "training loss parts (epoch means, mean over seeds)"
    if any(rs[0].kind == "none" for rs in groups.values()):
        suptitle += "; runs of type none have no KD term (not plotted)"
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_losses(groups: dict[str, list[RunRecord]], path: Path) -> None:
    save(loss_figure(groups), path)
