"""Accuracy vs compression ratio as a plain SVG (no plotting dependency): one panel per model,
one line per method, the full-cache score as a dashed line."""

from __future__ import annotations

from pathlib import Path

# panel geometry (pixels)
_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 420, 300, 50, 150, 30, 40
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a",
           "#ff9896", "#c5b0d5")

Curves = dict[str, dict[float, float]]  # method -> {budget fraction: average score x 100}


def _panel(title: str, curves: Curves, full: float | None, x0: int) -> list[str]:
    ratios = sorted({1 - b for c in curves.values() for b in c})
    lo, hi = (min(ratios), max(ratios)) if ratios else (0.0, 1.0)
    span = (hi - lo) or 1.0
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def px(ratio: float) -> float:
        return x0 + _PAD_L + (ratio - lo) / span * pw

    def py(score: float) -> float:
        return _PAD_T + (1 - score / 100) * ph

    out = [f'<text x="{x0 + _PAD_L}" y="18" font-size="13">{title}</text>',
           f'<rect x="{x0 + _PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="none" '
           'stroke="#999"/>']
    for v in (0, 25, 50, 75, 100):
        out.append(f'<text x="{x0 + _PAD_L - 8}" y="{py(v) + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{v}</text>')
    for r in ratios:
        out.append(f'<text x="{px(r):.1f}" y="{_H - _PAD_B + 14}" font-size="10" '
                   f'text-anchor="middle">{r:g}</text>')
    out.append(f'<text x="{x0 + _PAD_L + pw / 2}" y="{_H - 6}" font-size="11" '
               'text-anchor="middle">compression ratio (1 - budget)</text>')
    if full is not None:
        out.append(f'<line x1="{x0 + _PAD_L}" x2="{x0 + _PAD_L + pw}" y1="{py(full):.1f}" '
                   f'y2="{py(full):.1f}" stroke="#000" stroke-dasharray="4 3"/>')
    for i, (name, pts) in enumerate(sorted(curves.items())):
        color = _COLORS[i % len(_COLORS)]
        xy = " ".join(f"{px(1 - b):.1f},{py(v):.1f}" for b, v in sorted(pts.items(),
                                                                         reverse=True))
        out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.5">'
                   f'<title>{name}</title></polyline>')
        y = _PAD_T + 12 * i
        out.append(f'<text x="{x0 + _W - _PAD_R + 8}" y="{y + 8}" font-size="10" '
                   f'fill="{color}">{name}</text>')
    return out


def write_svg(path: str | Path, panels: dict[str, tuple[Curves, float | None]]) -> Path:
    """panels: model -> (curves, full-cache average); writes one row of panels to ``path``."""
    parts = []
    for i, (title, (curves, full)) in enumerate(panels.items()):
        parts += _panel(title, curves, full, i * _W)
    width = max(1, len(panels)) * _W
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_H}" '
           f'font-family="sans-serif">\n' + "\n".join(parts) + "\n</svg>\n")
    out = Path(path)
    out.write_text(svg)
    return out
