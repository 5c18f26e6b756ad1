"""What an image's first bytes say: its format and the size its header declares.

Read before PIL opens the data, so a decompression bomb is refused by size even where PIL
would refuse to open it at all (its own bomb limit), and formats other than PNG and JPEG are
named instead of being decoded.
"""
from __future__ import annotations

import struct

ACCEPTED = ("PNG", "JPEG")

# signatures of formats PIL could decode but the served model does not accept
_OTHER = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x97JB2", "JBIG2"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"qoif", "QOI"),
)
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff(data: bytes) -> str | None:
    """'PNG', 'JPEG', the name of another known format, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "AVIF/HEIF"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    for magic, name in _OTHER:
        if data.startswith(magic):
            return name
    return None


def declared_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG frame header; None if the header is not there."""
    if fmt == "PNG":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        return None
    if fmt == "JPEG":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
                i += 2
                continue
            if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
                return None
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker in _SOF:
                if i + 9 > len(data):
                    return None
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return width, height
            i += 2 + length
        return None
    return None
