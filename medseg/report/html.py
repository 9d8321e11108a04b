"""The self-contained ``report.html``: headline table, plots, per-case table, overlays.

Everything (pictures included, as base64 PNG) is inside the one file, so it can be mailed or
archived and opened in any browser.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

import numpy as np

_UNITS = {
    "hd": "mm",
    "hd95": "mm",
    "assd": "mm",
    "vol_ref_ml": "mL",
    "vol_pred_ml": "mL",
    "vol_diff_ml": "mL",
}
_HEADLINE = ("dice", "iou", "hd95", "hd", "assd", "nsd", "precision", "recall", "vol_diff_ml")
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left}
.fail{background:#fde2e2} .bad{color:#b00}
.plots img,.ov img{margin:4px;border:1px solid #ddd;vertical-align:top}
.ov figure{margin:6px 0 18px 0} .ov figcaption{font-size:13px}
.scroll{overflow-x:auto;max-width:100%}
.scroll table{margin:0}
.scroll td:first-child,.scroll th:first-child{position:sticky;left:0;z-index:1}
.scroll td:first-child{background:#fff} .scroll tr.fail td:first-child{background:#fde2e2}
.absent{color:#888;font-style:italic}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return html.escape(v)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _headline(summary: dict[str, Any], names: list[str]) -> str:
    rows = []
    metrics = summary["metrics"]
    cols = [m for m in _HEADLINE if any(m in metrics.get(n, {}) for n in names)]
    head = "".join(f"<th>{m}{' [' + _UNITS[m] + ']' if m in _UNITS else ''}</th>" for m in cols)
    for n in names:
        cells = []
        for m in cols:
            st = metrics.get(n, {}).get(m)
            if st is None:
                cells.append("<td>–</td>")
                continue
            txt = f"{_num(st['mean'])} ± {_num(st['std'])}<br><small>median {_num(st['median'])}"
            txt += f" [IQR {_num(st['iqr'])}]</small>"
            if st["n_inf"]:
                txt += f'<br><small class="bad">{st["n_inf"]} inf</small>'
            cells.append(f"<td>{txt}</td>")
        st0: dict[str, Any] = next(iter(metrics.get(n, {}).values()), {})
        counts = "".join(
            f"<td>{st0.get(k, 0)}</td>" for k in ("n", "n_absent", "n_empty_ref", "n_empty_pred")
        )
        rows.append(f'<tr><td class="l">{html.escape(n)}</td>{counts}{"".join(cells)}</tr>')
    return (
        '<div class="scroll"><table><tr><th class="l">class</th><th>n</th><th>absent</th>'
        f"<th>empty ref</th><th>empty pred</th>{head}</tr>{''.join(rows)}</table></div>"
    )


def _present(r: Any, n: str, m: str) -> bool:
    return n not in r.absent and m in r.metrics.get(n, {})


def _plots(ranked: list[Any], names: list[str]) -> str:
    from medseg.report.plots import box_strip_png

    ok = [r for r in ranked if r.error is None]
    parts = []
    for m in ("dice", "hd95", "assd", "nsd", "vol_diff_ml"):
        values = {n: [r.metrics[n][m] for r in ok if _present(r, n, m)] for n in names}
        values = {n: v for n, v in values.items() if v}  # a class absent everywhere: no box
        if values:
            parts.append(_img(box_strip_png(values, m, _UNITS.get(m, "")), f"{m} per class"))
    return f'<div class="plots">{"".join(parts)}</div>'


def _cell(r: Any, n: str, m: str, digits: int) -> str:
    if n in r.absent:
        return '<td class="absent">absent</td>'
    return f"<td>{_num(r.metrics.get(n, {}).get(m), digits)}</td>"


def _case_rows(ranked: list[Any], names: list[str], metrics: tuple[str, ...]) -> str:
    rows = []
    for r in ranked:
        cid = f'<td class="l">{html.escape(r.case_id)}</td>'
        if r.error is not None:
            rows.append(
                f'<tr class="fail">{cid}<td class="l" colspan="{len(metrics) * len(names) + 1}">'
                f"FAILED: {html.escape(r.error)}</td></tr>"
            )
            continue
        dice = [m["dice"] for n, m in r.metrics.items() if n not in r.absent]
        mean = float(np.mean(dice)) if dice else None
        cells = "".join(_cell(r, n, m, 2 if m in _UNITS else 3) for n in names for m in metrics)
        rows.append(f"<tr>{cid}<td>{_num(mean)}</td>{cells}</tr>")
    return "".join(rows)


def _case_table(ranked: list[Any], names: list[str], metrics: tuple[str, ...]) -> str:
    """Per-case table, one row per case and one column per class and metric, in a container
    that scrolls sideways with the case column kept in view."""
    label = {"dice": "Dice", "hd95": "HD95 [mm]", "nsd": "NSD"}
    head = "".join(
        f"<th>{html.escape(n)}{'' if metrics == ('dice',) else ' ' + label.get(m, m)}</th>"
        for n in names
        for m in metrics
    )
    title = "Dice per class" if metrics == ("dice",) else ""
    return (
        f'<div class="scroll"><table><tr><th class="l">case</th><th>mean Dice</th>{head}</tr>'
        f"{_case_rows(ranked, names, metrics)}</table></div>"
        + (f"<p><small>{title}; mean Dice over the classes present.</small></p>" if title else "")
    )


def _overlays(overlays: list[tuple[Any, Any]]) -> str:
    """``(case result, Overlay or why it is unavailable)`` pairs -> one figure per case, a
    picture per view."""
    from medseg.report.plots import overlay_png
    from medseg.report.views import EDGES

    figs = []
    for r, ov in overlays:
        if isinstance(ov, str):
            figs.append(f"<p>{html.escape(r.case_id)}: overlay unavailable ({html.escape(ov)})</p>")
            continue
        imgs, where = [], []
        for vs in ov.views:
            png = overlay_png(vs.background, vs.ref, vs.pred, vs.view.aspect, EDGES[vs.view.plane])
            imgs.append(_img(png, f"{r.case_id} {vs.view.plane}"))
            if vs.view.plane != "image":
                where.append(f"{vs.view.plane} slice {vs.view.index}")
        caption = (
            f"<b>{html.escape(r.case_id)}</b> · {html.escape(ov.name)} · Dice "
            f"{r.metrics[ov.name]['dice']:.3f} · over {ov.what}"
            + (f" · {', '.join(where)} (LPS voxel index)" if where else "")
            + " · green: reference, red: prediction"
        )
        figs.append(f"<figure>{''.join(imgs)}<figcaption>{caption}</figcaption></figure>")
    return f'<div class="ov">{"".join(figs)}</div>'


def _rules(summary: dict[str, Any]) -> str:
    """The sentences saying which classes were scored and what absent means."""
    out = f"<p>{html.escape(summary.get('classes_rule', ''))} "
    out += f"{html.escape(summary.get('absent_rule', ''))}</p>"
    gone = summary.get("absent_everywhere") or []
    if gone:
        out += (
            f'<p class="bad">Absent from every evaluated case (nothing to score: check the '
            f"label values): {html.escape(', '.join(gone))}</p>"
        )
    return out


def render_report(
    summary: dict[str, Any],
    ranked: list[Any],
    names: list[str],
    overlays: list[tuple[Any, Any]],
) -> str:
    """The report as one HTML string. ``overlays``: the worst cases' ``(CaseResult,
    OverlaySlice)``, or the reason in place of the slice (``evaluate.report_overlays``); the
    renderer reads no file."""
    title = html.escape(str(summary.get("title", "medseg evaluation")))
    fails = summary["failures"]
    fail_html = ""
    if fails:
        items = "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in fails.items()
        )
        fail_html = f'<h2 class="bad">{len(fails)} failed case(s)</h2><ul>{items}</ul>'
    settings = html.escape(", ".join(f"{k}={v}" for k, v in summary.get("settings", {}).items()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<p>{summary["n_evaluated"]} of {summary["n_cases"]} cases evaluated; NSD tolerance
{summary["tolerance_mm"]} mm. {settings}</p>
{fail_html}
<h2>Headline</h2>
<p>Mean ± std over cases with finite values; infinite distances (one mask empty) are counted
apart. Boundary distances as MONAI, NSD as DeepMind surface-distance.</p>
{_rules(summary)}
{_headline(summary, names)}
<h2>Distributions</h2>
{_plots(ranked, names)}
<h2>Worst cases</h2>
<p>Each case's worst class. 2D images as an image viewer shows them (row 0 at the top); 3D
scans in axial, coronal and sagittal views from the affine, in the radiological convention
(axial and coronal: patient's right on the image's left; axial: anterior up; coronal and
sagittal: superior up; sagittal: anterior on the left), each on the slice with the most
disagreeing voxels.</p>
{_overlays(overlays)}
<h2>Per case (worst first)</h2>
{_case_table(ranked, names, ("dice",))}
<details><summary>All metrics per case (Dice, HD95, NSD per class)</summary>
{_case_table(ranked, names, ("dice", "hd95", "nsd"))}
</details>
</body></html>
"""
