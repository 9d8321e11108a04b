"""Rich tables that describe a volume and the series of a DICOM folder (``medseg inspect``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from medseg.volume import Volume


def volume_table(vol: Volume, title: str) -> Table:
    """Rich table describing a volume: geometry in mm, orientation, dtype, value range."""
    import numpy as np
    from rich.table import Table

    from medseg.volume import describe_nonfinite

    def fmt(xs: tuple[float, ...] | list[float]) -> str:
        return " x ".join(f"{x:.6g}" for x in xs)

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("property", style="bold")
    t.add_column("value")
    t.add_row("format", str(vol.meta.get("format", "?")))
    t.add_row("shape (I, J, K)", f"{fmt(vol.shape)} voxels")
    t.add_row("channels", str(vol.channels))
    t.add_row("dtype", str(vol.array.dtype) + (" (label)" if vol.is_label else ""))
    t.add_row("spacing", f"{fmt(vol.spacing)} mm")
    t.add_row(
        "orientation", "".join(vol.orientation) + (" (oblique)" if vol.grid.is_oblique else "")
    )
    t.add_row("origin (RAS+)", f"({', '.join(f'{x:.6g}' for x in vol.origin)}) mm")
    if vol.grid.is_oblique:
        d = np.round(vol.direction, 4).tolist()
        t.add_row("direction columns", "; ".join(str(c) for c in zip(*d, strict=True)))
    for c in range(vol.channels):
        a = vol.array[c]
        finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
        rng = f"{finite.min():.6g} .. {finite.max():.6g}" if finite.size else "no finite values"
        t.add_row(f"range channel {c}", rng)
    bad = describe_nonfinite(vol.array)
    t.add_row("non-finite voxels", bad or "none")
    if vol.is_label or (np.issubdtype(vol.array.dtype, np.integer) and vol.channels == 1):
        values = np.unique(vol.array)
        if values.size <= 20:
            t.add_row("values", ", ".join(str(v) for v in values.tolist()))
    return t


def series_table(path: Path, infos: list[Any]) -> Table:
    """Rich table of DICOM series (``medseg.io.dicom.SeriesInfo``), one row per series."""
    from rich.table import Table

    t = Table(title=f"{path}: {len(infos)} DICOM series", title_justify="left")
    for name in ("#", "modality", "description", "slices", "rows x cols", "spacing (mm)"):
        t.add_column(name)
    for name in ("orient.", "transfer syntax", "files", "series UID"):
        t.add_column(name, overflow="fold")
    for info in infos:
        sp = getattr(info, "spacing", None)
        files = getattr(info, "files", ())
        t.add_row(
            str(getattr(info, "index", "?")),
            str(getattr(info, "modality", "")),
            str(getattr(info, "description", "")),
            str(getattr(info, "slices", "?")),
            f"{getattr(info, 'rows', '?')} x {getattr(info, 'columns', '?')}",
            " x ".join(f"{x:.4g}" for x in sp) if sp else "unknown",
            str(getattr(info, "orientation", "")),
            str(getattr(info, "transfer_syntax", "")),
            str(len(files)),
            str(getattr(info, "uid", "")),
        )
    return t
