"""Readers that turn raw datasets into `Sample`s: one image, its origin, and its labelled regions.

Every reader yields the same record type, so builders and validation never care where a sample
came from (SA-Med2D-style PNG folders, 3D scans, reports).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Region:
    """One labelled structure on an image: a vocabulary key and its binary mask file."""

    label: str  # key into medrega.vocab.BY_KEY
    mask: Path  # absolute path of a single-channel PNG, non-zero inside the structure


@dataclass(frozen=True)
class Sample:
    """One 2D image with its labelled regions and provenance."""

    image: Path  # absolute path
    rel_image: str  # path relative to the dataset root, as written into records
    modality: str  # key into medrega.vocab.MODALITIES
    dataset: str  # source set, e.g. "SynthAbdomen" or "ACDC"
    patient: str  # patient / volume id: splits never share one
    width: int
    height: int
    regions: tuple[Region, ...] = field(default_factory=tuple)
