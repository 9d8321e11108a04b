"""Report pictures as PNG bytes (matplotlib, Agg backend): box/strip plots and overlays."""

from __future__ import annotations

import io

import numpy as np


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib types stay local
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def box_strip_png(values: dict[str, list[float]], metric: str, unit: str = "") -> bytes:
    """Box plot per class with every finite case value as a jittered point.

    ``values`` maps class name -> per-case values; infinite values are counted in the axis
    label instead of drawn.
    """
    plt, fig = _figure(max(3.0, 1.2 * len(values) + 1.5), 3.0)
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)
    finite = [[v for v in values[n] if np.isfinite(v)] for n in names]
    n_inf = [sum(1 for v in values[n] if not np.isfinite(v)) for n in names]
    ax.boxplot([f if f else [np.nan] for f in finite], showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)
    for i, f in enumerate(finite):
        x = i + 1 + rng.uniform(-0.15, 0.15, len(f))
        ax.scatter(x, f, s=10, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(
        [f"{n}\n({k} inf)" if k else n for n, k in zip(names, n_inf, strict=True)], fontsize=8
    )
    ax.set_title(f"{metric}{' [' + unit + ']' if unit else ''}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)  # constant metrics read as values
    return _png(plt, fig)


def overlay_png(
    background: np.ndarray, ref: np.ndarray, pred: np.ndarray, title: str, aspect: float = 1.0
) -> bytes:
    """One 2D slice: reference (green) and prediction (red) contours over ``background``.

    Arrays are ``(I, J)``; drawn with I to the right and J up, as a radiologist's axial view
    of a RAS volume.
    """
    plt, fig = _figure(4.2, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    bg = np.asarray(background, dtype=np.float64).T
    lo, hi = np.percentile(bg, [1, 99]) if bg.size else (0.0, 1.0)
    ax.imshow(
        bg,
        cmap="gray",
        origin="lower",
        vmin=lo,
        vmax=hi if hi > lo else lo + 1,
        aspect=aspect,
        interpolation="nearest",
    )
    for mask, colour in ((ref, "lime"), (pred, "red")):
        m = np.asarray(mask, dtype=np.float64).T
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=colour, linewidths=1.0, origin="lower")
    ax.set_title(title + "\n(green: reference, red: prediction)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(plt, fig)
