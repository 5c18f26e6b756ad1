"""The evaluation report: one self-contained HTML page (images embedded as base64 PNGs).

Sections: headline figures per task, the same by modality and by language, the IoU
distribution of region tasks, the most common name confusions, a gallery of test images
with ground-truth (green) and predicted (red) boxes and their names, and the figures the
authors' released evaluators give on the same answers. Every table's caption names the
protocol that made its figures: ours (`medrega`) or theirs (`release`), never mixed in one table.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from medrega.fonts import label_font
from medrega.grammar import decode_box, parse_regions

GT_COLOUR, PRED_COLOUR = (0, 200, 0), (230, 30, 30)
IOU_BINS = 10
OURS = "protocol: medrega (ours, SPEC §6; precision and recall in the standard sense)"
THEIRS = "protocol: release (the authors' released evaluator, defects included; their keys)"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _table(rows: dict[str, dict[str, Any]], first: str, protocol: str = OURS) -> str:
    """Rows keyed by label; columns are the scalar figures of the first row; the caption names
    the protocol that made them."""
    if not rows:
        return "<p>none</p>"
    cols = [k for k, v in next(iter(rows.values())).items() if k not in ("by", "precision_recall_note", "protocol") and not isinstance(v, dict)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(f"<tr><th>{html.escape(str(label))}</th>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for label, r in rows.items())
    return (f"<table><caption>{html.escape(protocol)}</caption><tr><th>{html.escape(first)}</th>{head}</tr>"
            f"{body}</table>")


def _iou_histogram(samples: list[dict]) -> str:
    ious = [s["iou"] for s in samples if s["task"] in ("t2r", "grounded")]
    if not ious:
        return "<p>no region task in this evaluation</p>"
    counts = Counter(min(int(v * IOU_BINS), IOU_BINS - 1) for v in ious)
    top = max(counts.values())
    rows = "".join(
        f"<tr><td>{b / IOU_BINS:.1f}–{(b + 1) / IOU_BINS:.1f}</td><td>{counts[b]}</td>"
        f"<td><div class=bar style='width:{300 * counts[b] / top:.0f}px'></div></td></tr>"
        for b in range(IOU_BINS))
    return (f"<table><caption>{html.escape(OURS)}</caption><tr><th>sample IoU</th><th>samples</th><th></th></tr>"
            f"{rows}</table>")


def confusions(items: list[dict], samples: list[dict], top: int = 15) -> list[tuple[str, str, int]]:
    """(truth, predicted, count): matched boxes with the wrong name, and wrong R2T names."""
    pairs: Counter = Counter()
    for s in samples:
        if s["task"] in ("t2r", "grounded"):
            pairs.update((m["gt_name"], m["pred_name"] or "(no name)") for m in s["matches"] if not m["name"])
        elif s["task"] == "r2t" and not s["name_accuracy"]:
            item = items[s["index"]]
            pairs[(item.get("ground_truth") or "", (item.get("prediction") or "").strip() or "(empty)")] += 1
    return [(t, p, n) for (t, p), n in pairs.most_common(top)]


def draw(item: dict, root: Path | None = None) -> str | None:
    """Base64 PNG of the item's image with both box sets drawn, or None if it cannot be read."""
    path = Path(item.get("image") or "")
    if root is not None and not path.is_absolute():
        path = root / path
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError):
        return None
    # boxes are on the 0-999 grid of the original size; the file may be stored at another size
    w, h = image.size
    pen = ImageDraw.Draw(image)
    font = label_font(max(11, min(w, h) // 24))  # Chinese names as glyphs, not missing-glyph boxes
    for text, colour in ((item.get("ground_truth"), GT_COLOUR), (item.get("prediction"), PRED_COLOUR)):
        for name, box in parse_regions(text).regions:
            x1, y1, x2, y2 = decode_box(box, w, h)
            pen.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            pen.text((x1 + 2, y1 + 1), name or "?", fill=colour, font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _gallery(items: list[dict], samples: list[dict], limit: int, root: Path | None) -> str:
    region = [s for s in samples if s["task"] in ("t2r", "grounded")]
    # the worst and the best: a reader learns most from both ends
    chosen = sorted(region, key=lambda s: s["iou"])
    chosen = chosen[: limit // 2] + chosen[len(chosen) - (limit - limit // 2):] if len(chosen) > limit else chosen
    cards = []
    for s in chosen:
        item = items[s["index"]]
        png = draw(item, root)
        if png is None:
            continue
        caption = (f"{html.escape(str(item.get('modality')))} · {html.escape(str(item.get('lang')))} · "
                   f"{html.escape(str(item.get('setting') or s['task']))} · IoU {s['iou']:.2f}"
                   + (" · parse failure" if s["parse_failure"] else ""))
        cards.append(f"<figure><img src='data:image/png;base64,{png}'><figcaption>{caption}<br>"
                     f"<small>pred: {html.escape(str(item.get('prediction')))}</small></figcaption></figure>")
    return "<div class=gallery>" + "".join(cards) + "</div>" if cards else "<p>no images to show</p>"


def _release(block: Any) -> str:
    """The authors' protocol's figures, one table per task and setting (or language): their
    scripts print different keys for each, so no table mixes two scripts."""
    if not isinstance(block, dict):
        return ""
    parts = ["<h2>The authors' released evaluators (protocol: release)</h2>",
             f"<p><em>{html.escape(str(block.get('note', '')))}; source {html.escape(str(block.get('source', '')))}. "
             "Compare these with the paper's figures; the tables above are ours.</em></p>"]
    for task, subs in block.items():
        if task in ("protocol", "source", "note"):
            continue
        if not isinstance(subs, dict):  # a task they ship no evaluator for
            parts.append(f"<p>{html.escape(task)}: {html.escape(str(subs))}</p>")
            continue
        for sub, fig in subs.items():
            script = html.escape(str(fig.get("script", "")))
            if "not_computed" in fig:
                parts.append(f"<p>{html.escape(task)} · {html.escape(sub)}: {html.escape(fig['not_computed'])}</p>")
                continue
            row = {k: v for k, v in fig.items() if k != "script"}
            parts.append(f"<h3>{html.escape(task)} · {html.escape(sub)} <small>({script})</small></h3>"
                         + _table({sub: row}, "release", THEIRS))
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}caption{font-size:11px;color:#555;text-align:left}.bar{background:#4a7;height:10px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{width:260px;margin:0}figure img{width:256px}
figcaption{font-size:12px}.gt{color:#0a0}.pred{color:#e11}"""


def render(result: dict[str, Any], items: list[dict], samples: list[dict], title: str = "MedRegA evaluation",
           gallery: int = 12, image_root: Path | None = None) -> str:
    tasks = {t: m for t, m in result.items() if isinstance(m, dict) and "n" in m}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    note = next((m["precision_recall_note"] for m in tasks.values() if "precision_recall_note" in m), None)
    if note:
        parts.append(f"<p><em>{html.escape(note)}</em></p>")
    parts.append("<h2>Headline</h2>")
    for task, m in tasks.items():
        parts.append(f"<h3>{html.escape(task)}</h3>" + _table({"all": m}, "samples"))
    for key, label in (("by_modality", "modality"), ("by_lang", "language"), ("by_setting", "setting")):
        blocks = [(t, m["by"][key]) for t, m in tasks.items() if m.get("by", {}).get(key)]
        if blocks:
            parts.append(f"<h2>By {label}</h2>")
            parts += [f"<h3>{html.escape(t)}</h3>" + _table(rows, label) for t, rows in blocks]
    models = result.get("model_metrics", {})
    if models:
        parts.append("<h2>Metrics that need model weights</h2>")
        text = {k: v for k, v in models.items() if not isinstance(v, dict)}
        if text:
            parts.append("<ul>" + "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in text.items()) + "</ul>")
        for k, per_task in models.items():
            if isinstance(per_task, dict):
                parts.append(f"<h3>{html.escape(k)}</h3>" + _table(per_task, "task"))
    parts.append(_release(result.get("release")))
    parts.append("<h2>IoU distribution (T2R and grounded reports)</h2>" + _iou_histogram(samples))
    conf = confusions(items, samples)
    parts.append("<h2>Most common name confusions</h2>" + (
        f"<table><caption>{html.escape(OURS)}</caption><tr><th>truth</th><th>predicted</th><th>count</th></tr>"
        + "".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(p)}</td><td>{n}</td></tr>" for t, p, n in conf)
        + "</table>" if conf else "<p>none</p>"))
    parts.append("<h2>Gallery</h2><p><span class=gt>green: ground truth</span>, "
                 "<span class=pred>red: prediction</span></p>" + _gallery(items, samples, gallery, image_root))
    parts.append("</body></html>")
    return "\n".join(parts)
