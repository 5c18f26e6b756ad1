"""Chinese region names are drawn as glyphs, not as missing-glyph boxes, in `predict` overlays
and in the report's gallery."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageFont

from medrega.fonts import cjk_font_path, label_font
from medrega.metrics import html
from medrega.scans import draw_regions
from medrega.grammar import format_regions

NAME = "肝脏"                     # liver
MISSING = "\U0010fffd\U0010fffe"  # private-use code points no font draws: the missing-glyph box


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_font_has_the_chinese_glyphs():
    assert cjk_font_path() is not None  # pylopdf-fonts-zh-cn is a pinned dependency
    font = label_font(32)
    box = font.getmask(MISSING[0])
    glyphs = [font.getmask(ch) for ch in NAME]
    for ch, glyph in zip(NAME, glyphs):
        assert glyph.getbbox() is not None, ch  # something is drawn
        assert bytes(glyph) != bytes(box), f"{ch} is drawn as the missing-glyph box"
    assert bytes(glyphs[0]) != bytes(glyphs[1])


def test_pillow_default_font_would_fail_this_check():
    """The check above can fail: Pillow's own font draws the same box for both characters."""
    try:
        font = ImageFont.load_default(size=32)
    except TypeError:  # Pillow < 10.1: a bitmap font without CJK either
        font = ImageFont.load_default()
    assert bytes(font.getmask(NAME[0])) == bytes(font.getmask(MISSING[0]))


def test_predict_overlay_draws_chinese_names():
    scan = Image.new("RGB", (120, 90), (30, 30, 30))
    named, missing = (pixels(draw_regions(scan, [{"name": name, "box": [10, 40, 100, 80]}])) for name in (NAME, MISSING))
    differ = np.argwhere((named != missing).any(axis=2))
    assert len(differ) > 0  # the label is not the two missing-glyph boxes
    top = differ[:, 0].min()
    assert top < 40 * 2  # and the difference is the label above the box (scale 2), not the box itself


def test_report_gallery_draws_chinese_names(tmp_path):
    image = tmp_path / "ct.png"
    Image.new("RGB", (200, 160)).save(image)

    def drawn(name: str) -> np.ndarray:
        item = {"image": str(image), "ground_truth": format_regions([(name, [[100, 300, 600, 900]])]), "prediction": ""}
        return pixels(Image.open(io.BytesIO(base64.b64decode(html.draw(item)))))

    assert (drawn(NAME) != drawn(MISSING)).any()
