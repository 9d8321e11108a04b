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
.plots img,.ov img{margin:4px;border:1px solid #ddd}
.ov figure{display:inline-block;margin:6px}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return html.escape(v)
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
        any_st = next(
            iter(metrics.get(n, {}).values()), {"n": 0, "n_empty_ref": 0, "n_empty_pred": 0}
        )
        rows.append(
            f'<tr><td class="l">{html.escape(n)}</td><td>{any_st["n"]}</td>'
            f"<td>{any_st['n_empty_ref']}</td><td>{any_st['n_empty_pred']}</td>{''.join(cells)}</tr>"
        )
    return (
        '<table><tr><th class="l">class</th><th>n</th><th>empty ref</th><th>empty pred</th>'
        f"{head}</tr>{''.join(rows)}</table>"
    )


def _plots(ranked: list[Any], names: list[str]) -> str:
    from medseg.report.plots import box_strip_png

    ok = [r for r in ranked if r.error is None]
    parts = []
    for m in ("dice", "hd95", "assd", "nsd", "vol_diff_ml"):
        values = {n: [r.metrics[n][m] for r in ok if m in r.metrics.get(n, {})] for n in names}
        if any(values.values()):
            parts.append(_img(box_strip_png(values, m, _UNITS.get(m, "")), f"{m} per class"))
    return f'<div class="plots">{"".join(parts)}</div>'


def _case_table(ranked: list[Any], names: list[str]) -> str:
    head = "".join(
        f"<th>{html.escape(n)} dice</th><th>{html.escape(n)} HD95</th><th>{html.escape(n)} NSD</th>"
        for n in names
    )
    rows = []
    for r in ranked:
        if r.error is not None:
            rows.append(
                f'<tr class="fail"><td class="l">{html.escape(r.case_id)}</td>'
                f'<td class="l" colspan="{3 * len(names) + 1}">FAILED: {html.escape(r.error)}'
                "</td></tr>"
            )
            continue
        cells = []
        for n in names:
            m = r.metrics.get(n, {})
            cells.append(
                f"<td>{_num(m.get('dice'))}</td><td>{_num(m.get('hd95'), 2)}</td>"
                f"<td>{_num(m.get('nsd'))}</td>"
            )
        mean = np.mean([m["dice"] for m in r.metrics.values()]) if r.metrics else float("nan")
        rows.append(
            f'<tr><td class="l">{html.escape(r.case_id)}</td><td>{_num(float(mean))}</td>'
            f"{''.join(cells)}</tr>"
        )
    return f'<table><tr><th class="l">case</th><th>mean dice</th>{head}</tr>{"".join(rows)}</table>'


def _overlays(overlays: list[tuple[Any, Any]]) -> str:
    """``(case result, OverlaySlice or why it is unavailable)`` pairs -> figures."""
    from medseg.report.plots import overlay_png

    figs = []
    for r, ov in overlays:
        if isinstance(ov, str):
            figs.append(f"<p>{html.escape(r.case_id)}: overlay unavailable ({html.escape(ov)})</p>")
            continue
        png = overlay_png(
            ov.background,
            ov.ref,
            ov.pred,
            f"{r.case_id} · {ov.name} · slice k={ov.k} · over {ov.what} · "
            f"dice {r.metrics[ov.name]['dice']:.3f}",
            aspect=ov.aspect,
        )
        figs.append(f"<figure>{_img(png, r.case_id + ' overlay')}</figure>")
    return f'<div class="ov">{"".join(figs)}</div>'


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
{_headline(summary, names)}
<h2>Distributions</h2>
{_plots(ranked, names)}
<h2>Worst cases</h2>
<p>The slice with the most disagreeing voxels of each case's worst class.</p>
{_overlays(overlays)}
<h2>Per case (worst first)</h2>
{_case_table(ranked, names)}
</body></html>
"""
