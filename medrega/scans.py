"""Reading a user's scan for `medrega predict`, and drawing the answer's regions on it.

DICOM (PHI rule): only pixel data and the tags needed to display it are read; no identifier
(name, ID, dates, institution) is ever printed, logged or put into an error message.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medrega.errors import BadInput
from medrega.fonts import label_font
from medrega.images import FORMAT, TOO_LARGE, ImageRefused, open_image

MAX_SCAN_PIXELS = 40_000_000  # the validate stage's and the server's bound

COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa"]


class ScanError(BadInput):
    """The file is not a PNG, JPEG or DICOM image we can read."""


def is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return path.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM"


def read_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as err:  # the message may quote header values: keep only the type
        raise ScanError(f"{path.name}: cannot read DICOM pixel data ({type(err).__name__})") from None
    if pixels.ndim == 4 or (pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1):
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the central frame, as for 3D scans
    if pixels.ndim == 3:  # RGB (e.g. ultrasound)
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    values = values.astype(np.float64)
    lo, hi = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray((scaled * 255).astype(np.uint8)).convert("RGB")


def read_scan(path: Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    if is_dicom(path):
        return read_dicom(path)
    try:
        # the size from the header first, PIL's limits for this call only (medrega.images)
        return open_image(path, MAX_SCAN_PIXELS, formats=("PNG", "JPEG")).convert("RGB")
    except ImageRefused as refused:
        if refused.reason == FORMAT:
            raise ScanError(f"{path.name}: {refused.detail.split(' is not')[0]} is not supported (PNG, JPEG or DICOM)") \
                from None
        if refused.reason == TOO_LARGE:
            raise ScanError(f"{path.name}: {refused.detail}") from None
        raise ScanError(f"{path.name}: not a readable PNG, JPEG or DICOM file") from None


def draw_regions(image: Image.Image, regions: list[dict], scale: int = 2) -> Image.Image:
    """The image (upscaled `scale` times for legibility) with each box drawn and named."""
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = label_font(max(12, canvas.width // 40))  # draws Chinese names too
    for i, region in enumerate(regions):
        colour = COLOURS[i % len(COLOURS)]
        x1, y1, x2, y2 = (v * scale for v in region["box"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(2, scale))
        label = region.get("name") or "region"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        top_y = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y2 + 2
        draw.rectangle([x1, top_y, x1 + (right - left) + 6, top_y + (bottom - top) + 4], fill=colour)
        draw.text((x1 + 3, top_y + 1 - (top - y1)), label, fill="black", font=font)
    return canvas
