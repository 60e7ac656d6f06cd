"""The INT8 report's per-block SNR as an SVG bar chart, written by hand (no plotting library).

One bar per block in model order, its simulated W8A8 SNR (dB) as its height, flagged blocks
in red, the flag line dashed. Torch-free: it reads the report's JSON (`Int8Report.to_dict()`).
"""

from __future__ import annotations

from html import escape
from typing import Any

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 300, 48, 40, 28
TOP_DB = 60.0  # the chart's ceiling; higher (or infinite) figures are drawn at it


def _y(db: float) -> float:
    clipped = max(0.0, min(db, TOP_DB))
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - clipped / TOP_DB)


def svg(doc: dict[str, Any]) -> str:
    """The chart of `doc`'s blocks, in model order."""
    blocks = {b["path"]: b for b in doc["blocks"]}
    paths = [p for p in doc.get("block_order", list(blocks)) if p in blocks]
    span = (WIDTH - LEFT - 10) / max(1, len(paths))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{LEFT}" y="16" font-size="13">simulated W8A8 SNR per block (dB); whole '
        f"model {_label(doc['model_w8a8_snr_db'])} dB</text>",
    ]
    for db in range(0, int(TOP_DB) + 1, 10):
        y = _y(db)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{db}</text>')
    for i, path in enumerate(paths):
        block = blocks[path]
        db = block["w8a8_snr_db"]
        y = _y(TOP_DB if db is None else db)
        x = LEFT + i * span + span * 0.1
        colour = "#c0392b" if block["flagged"] else "#2e86c1"
        title = escape(f"{path or '<root>'}: {_label(db)} dB")
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{span * 0.8:.1f}" '
            f'height="{_y(0) - y:.1f}" fill="{colour}"><title>{title}</title></rect>'
        )
        if len(paths) <= 40:
            parts.append(
                f'<text x="{x + span * 0.4:.1f}" y="{HEIGHT - BOTTOM + 12}" text-anchor="end" '
                f'transform="rotate(-45 {x + span * 0.4:.1f} {HEIGHT - BOTTOM + 12})">'
                f"{escape(path or '<root>')}</text>"
            )
    flag = _y(float(doc["scheme"]["flag_below_db"]))
    parts.append(
        f'<line x1="{LEFT}" x2="{WIDTH - 10}" y1="{flag:.1f}" y2="{flag:.1f}" stroke="#c0392b" '
        'stroke-dasharray="4 3"/>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _label(db: float | None) -> str:
    return "inf" if db is None else f"{db:.1f}"
