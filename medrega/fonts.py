"""The font for region names drawn into pictures (predict overlays, the report's gallery).

Names are bilingual: Pillow's built-in font has no CJK glyphs and draws a Chinese name as
missing-glyph boxes. Noto Sans SC (SIL Open Font License 1.1; Latin and Simplified Chinese)
comes from the `pylopdf-fonts-zh-cn` wheel, a data-only package of the unmodified Noto CJK
files; without it we fall back to Pillow's font so nothing breaks, only Chinese names degrade.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont


def cjk_font_path() -> Path | None:
    try:
        import pylopdf_fonts_zh_cn
    except ImportError:
        return None
    path = Path(pylopdf_fonts_zh_cn.sans_path())
    return path if path.is_file() else None


@lru_cache(maxsize=16)
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font of `size` pixels that draws Latin and Chinese names."""
    path = cjk_font_path()
    if path is not None:
        return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()
