"""Report pictures as PNG bytes (matplotlib, Agg backend): box/strip plots and overlays."""

from __future__ import annotations

import io
import textwrap

import numpy as np


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib types stay local
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig, tight: bool = True) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buf.getvalue()


def _tick_label(name: str, n_inf: int) -> str:
    """A class name wrapped to 14 characters a line (BraTS' "non-enhancing tumour")."""
    text = "\n".join(textwrap.wrap(name, 14)) or name
    return f"{text}\n({n_inf} inf)" if n_inf else text


def box_strip_figure(values: dict[str, list[float]], metric: str, unit: str = ""):  # noqa: ANN201
    """The figure of :func:`box_strip_png` (``(pyplot, figure)``, for drawing or testing).

    Class names are wrapped and, from four classes on, set at 35 degrees with their own
    width of axis, so they never overlap."""
    names = list(values)
    plt, fig = _figure(max(3.0, 1.1 * len(names) + 1.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    finite = [[v for v in values[n] if np.isfinite(v)] for n in names]
    n_inf = [sum(1 for v in values[n] if np.isinf(v)) for n in names]
    ax.boxplot([f if f else [np.nan] for f in finite], showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)
    for i, f in enumerate(finite):
        x = i + 1 + rng.uniform(-0.15, 0.15, len(f))
        ax.scatter(x, f, s=10, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(names) + 1))
    rotate = len(names) >= 4
    ax.set_xticklabels(
        [_tick_label(n, k) for n, k in zip(names, n_inf, strict=True)],
        fontsize=8,
        rotation=35 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor" if rotate else "default",
    )
    ax.set_title(f"{metric}{' [' + unit + ']' if unit else ''}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)  # constant metrics read as values
    return plt, fig


def box_strip_png(values: dict[str, list[float]], metric: str, unit: str = "") -> bytes:
    """Box plot per class with every finite case value as a jittered point.

    ``values`` maps class name -> per-case values (absent classes left out by the caller);
    infinite values are counted in the axis label instead of drawn.
    """
    plt, fig = box_strip_figure(values, metric, unit)
    return _png(plt, fig)


#: Long side of an overlay picture in pixels (readable without zooming).
VIEW_PX = 384


def overlay_png(
    background: np.ndarray,
    ref: np.ndarray,
    pred: np.ndarray,
    aspect: float = 1.0,
    edges: tuple[str, str, str, str] = ("", "", "", ""),
) -> bytes:
    """One picture: reference (green) and prediction (red) contours over ``background``.

    Arrays are ``(rows, columns)`` as ``medseg.report.views.cut`` gives them, drawn with row 0
    at the top; ``aspect`` is a pixel's height over its width (mm / mm); ``edges`` are the
    patient directions written at the (left, right, top, bottom) edges. The PNG is
    :data:`VIEW_PX` pixels on its long side, the picture filling it.
    """
    bg = np.asarray(background, dtype=np.float64)
    rows, cols = bg.shape
    height, width = rows * aspect, float(cols)
    scale = VIEW_PX / max(height, width)
    plt, fig = _figure(max(width * scale, 16) / 100, max(height * scale, 16) / 100)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    lo, hi = np.percentile(bg, [1, 99]) if bg.size else (0.0, 1.0)
    ax.imshow(
        bg,
        cmap="gray",
        origin="upper",
        vmin=lo,
        vmax=hi if hi > lo else lo + 1,
        aspect="auto",  # the figure itself has the picture's physical proportions
        interpolation="nearest",
    )
    for mask, colour in ((ref, "lime"), (pred, "red")):
        m = np.asarray(mask, dtype=np.float64)
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=colour, linewidths=1.2)
    for text, xy, ha, va in zip(
        edges,
        ((0.02, 0.5), (0.98, 0.5), (0.5, 0.98), (0.5, 0.02)),
        ("left", "right", "center", "center"),
        ("center", "center", "top", "bottom"),
        strict=True,
    ):
        if text:
            ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=11)
    ax.set_axis_off()
    return _png(plt, fig, tight=False)
