"""Deterministic synthetic scans in the SA-Med2D-20M layout (the embedded default raw data).

Layout written under `root` (mirrors the real release so one reader serves both):

    root/images/ct_00--SynthAbdomenCT--patient0002--z_0030.png
    root/masks/ct_00--SynthAbdomenCT--patient0002--z_0030--0000_001.png
    root/SAMed2D_v1.json                 {"images/<img>.png": ["masks/<mask>.png", ...]}
    root/SAMed2D_v1_class_mapping_id.json  {"<dataset>": {"<label>": <class id>, ...}}

Mask names are `{image stem}--{class id:04d}_{instance:03d}.png`; the class id is looked up in
the class mapping of the image's dataset, whose labels are vocabulary keys (medrega.vocab).

Each image is a smooth background plus 2-4 filled blobs (1-2 where the vocabulary offers fewer
structures for the modality: dermoscopy has one), each with its own mean intensity plus noise, so
a tiny model can learn to name and locate them. Some structures (lesions, nuclei) are drawn as
2-3 separate components so "one box per connected component" matters.

Where the blobs are varies as real anatomy does, so the image (not a per-name mean box) tells
where a structure is (`GEOMETRY`, per scene):
- patient: body (or head, lesion, gland) size and field-of-view zoom, aspect, position in the
  field of view and a small rotation, one transform per patient that moves the background and
  every structure together, so organs keep their relative arrangement; plus each organ's own
  offset, size, aspect and angle;
- slice level (CT/MR volumes): each slice sits at a level of the scanned slab; an organ appears
  only over its craniocaudal extent (kidneys low in the abdomen, the heart low in the chest, the
  right ventricle not at the apex) and its cross-section is largest mid-extent;
- per image: cardiac phase (echo), inspiration (chest X-ray), probe position (ultrasound),
  fixation (fundus), B-scan position (OCT), a new field of view (histology tiles, dermoscopy);
- left-right: never mirrored where the name has a side (CT, MR, X-ray, ultrasound: the patient's
  right stays on the image's left); fundus photos alternate left and right eyes (the optic disc
  is on the nasal side), OCT and histology may be mirrored;
- lesions: anywhere inside their host organ within the part the report names (right lobe of the
  liver, tail of the pancreas, right frontal lobe, upper lung, central retina, above the macula;
  medrega.sources.findings), clipped to the host so they never stick out of it.
Everything is seeded per (seed, modality, patient, slice) (the slice levels and the patient's
transform per (seed, modality, patient)): re-running gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medrega.vocab import BY_KEY, MODALITIES
from medrega.errors import BadInput

MAPPING_FILE = "SAMed2D_v1.json"
CLASS_MAPPING_FILE = "SAMed2D_v1_class_mapping_id.json"
RGB_MODALITIES = ("pathology", "dermoscopy", "fundus")
VOLUME_MODALITIES = ("ct", "mr")  # 3D sources: axial "z" slices; the rest are 2D ("x_0000")
MIN_COMPONENT_PIXELS = 10  # well above the reader's default min_mask_pixels (4)
MIN_RADIUS_PX = 2.5  # so every blob keeps at least ~MIN_COMPONENT_PIXELS pixels
MIN_SECTION = 0.45  # an organ is drawn at levels where its cross-section is >= this share of its largest
PLACE_TRIES = 8  # candidate positions drawn per placed lesion (the first inside the allowed disc wins)


# One structure in a scene: centre and radii as fractions of the image side for the reference
# patient (x to the right, y down; radiological convention, so the patient's right is on the
# image's left), rotation in degrees, fill value (gray or RGB), how often it is split into
# several components, a hole (inner radius fraction) for ring-shaped structures such as the
# myocardium, and the structure it is never drawn without (`needs`: a lesion's host organ).
# Variation (module docstring):
#   z=(centre, half extent): slab levels (0 top .. 1 bottom) where the organ exists; its
#       cross-section scales as an ellipsoid's, sqrt(1 - ((level - centre) / half extent)^2);
#   drift=(dx, dy): in-plane shift of its centre per unit of level (from mid-slab);
#   gate=(lo, hi): slab levels where a lesion can be seen (lung nodules in the upper lobe);
#   place=(ref, u0, u1, v0, v1, r): a lesion's centre, per patient, uniform in that box of
#       `ref`'s own frame (units of its radii, u along its x radius) and within radius r;
#   anchor: share another structure's pose (the left ventricle inside the myocardium ring);
#   cycle=(lo, hi, mode): per-image size factor from the image's phase ("iso": both radii,
#       "apex": height only with the top fixed, as lungs at inspiration);
#   roam=(lo, hi): per-image centre uniform in [lo, hi]^2 (tissue tiles, photos), kept apart
#       from the structures placed before it;
#   jit: scale of the organ's own offset/size/aspect/angle variation;
#   wobble: scale of its outline's irregularity (the brain follows the skull).
def S(key, cx, cy, rx, ry, value, angle=0.0, split=0.0, parts=2, hole=0.0, needs=None, z=None,
      drift=(0.0, 0.0), gate=None, place=None, anchor=None, cycle=None, roam=None, jit=1.0, wobble=1.0):
    return dict(key=key, cx=cx, cy=cy, rx=rx, ry=ry, value=value, angle=angle, split=split,
                parts=parts, hole=hole, needs=needs, z=z, drift=drift, gate=gate, place=place,
                anchor=anchor, cycle=cycle, roam=roam, jit=jit, wobble=wobble)


# modality -> list of (dataset, background kind, structures in painting order: hosts before the
# lesions drawn inside them). Patient p of a modality belongs to scene p % len(scenes).
SCENES: dict[str, list[tuple[str, str, list[dict]]]] = {
    "ct": [
        ("SynthAbdomenCT", "body", [
            S("liver", 0.32, 0.42, 0.17, 0.14, 150, angle=-20, z=(0.32, 0.46), drift=(-0.03, 0.05)),
            S("spleen", 0.74, 0.44, 0.07, 0.10, 130, angle=15, z=(0.28, 0.34), drift=(0.02, 0.04)),
            S("stomach", 0.60, 0.32, 0.10, 0.07, 95, z=(0.25, 0.34), drift=(0.02, -0.03)),
            S("gallbladder", 0.36, 0.58, 0.04, 0.03, 55, z=(0.55, 0.2), drift=(0.0, 0.04)),
            S("pancreas", 0.56, 0.52, 0.11, 0.035, 120, angle=-10, z=(0.55, 0.26)),
            S("aorta", 0.50, 0.64, 0.035, 0.035, 215),
            S("right_kidney", 0.36, 0.72, 0.055, 0.075, 185, z=(0.76, 0.30), drift=(-0.03, 0.03)),
            S("left_kidney", 0.64, 0.72, 0.055, 0.075, 185, z=(0.70, 0.30), drift=(0.03, 0.03)),
            S("liver_tumor", 0.28, 0.40, 0.035, 0.03, 90, split=0.5, needs="liver",
              place=("liver", -0.7, 0.15, -0.6, 0.6, 0.65)),
            S("kidney_tumor", 0.64, 0.70, 0.025, 0.025, 110, needs="left_kidney",
              place=("left_kidney", -0.55, 0.55, -0.55, 0.55, 0.55)),
            S("pancreatic_cancer", 0.62, 0.52, 0.025, 0.02, 75, needs="pancreas",
              place=("pancreas", 0.3, 0.7, -0.3, 0.3, 0.75)),
        ]),
        ("SynthChestCT", "body", [
            S("right_lung", 0.30, 0.48, 0.16, 0.26, 20, z=(0.5, 0.6)),
            S("left_lung", 0.70, 0.48, 0.15, 0.26, 20, z=(0.5, 0.6)),
            S("heart", 0.56, 0.58, 0.12, 0.10, 140, angle=-25, z=(0.72, 0.36), drift=(0.02, 0.03)),
            S("aorta", 0.50, 0.30, 0.035, 0.035, 215),
            S("lung_nodule", 0.26, 0.36, 0.025, 0.025, 170, split=0.5, needs="right_lung",
              gate=(0.0, 0.55), place=("right_lung", -0.6, 0.6, -0.6, 0.6, 0.65)),
        ]),
    ],
    "mr": [
        ("SynthCardiacMR", "body", [
            S("myocardium", 0.58, 0.50, 0.13, 0.13, 70, hole=0.72, needs="left_ventricle",
              z=(0.3, 0.8), drift=(0.03, 0.03)),
            S("left_ventricle", 0.58, 0.50, 0.092, 0.092, 210, anchor="myocardium"),
            S("right_ventricle", 0.38, 0.46, 0.08, 0.12, 185, angle=10, z=(0.3, 0.6)),
        ]),
        ("SynthBrainMR", "head", [
            S("brain", 0.50, 0.50, 0.34, 0.40, 130, z=(0.5, 0.65), jit=0.1, wobble=0.3),
            S("brain_tumor", 0.40, 0.38, 0.06, 0.05, 225, split=0.5, needs="brain",
              place=("brain", -0.7, -0.12, -0.75, -0.12, 0.75)),
        ]),
        ("SynthAbdomenMR", "body", [
            S("liver", 0.32, 0.42, 0.17, 0.14, 115, angle=-20, z=(0.32, 0.46), drift=(-0.03, 0.05)),
            S("spleen", 0.74, 0.44, 0.07, 0.10, 160, angle=15, z=(0.28, 0.34), drift=(0.02, 0.04)),
            S("gallbladder", 0.36, 0.58, 0.04, 0.03, 235, z=(0.55, 0.2), drift=(0.0, 0.04)),
            S("right_kidney", 0.36, 0.72, 0.055, 0.075, 190, z=(0.76, 0.30), drift=(-0.03, 0.03)),
            S("left_kidney", 0.64, 0.72, 0.055, 0.075, 190, z=(0.70, 0.30), drift=(0.03, 0.03)),
            S("liver_tumor", 0.28, 0.40, 0.035, 0.03, 200, split=0.5, needs="liver",
              place=("liver", -0.7, 0.15, -0.6, 0.6, 0.65)),
        ]),
    ],
    "xray": [
        ("SynthChestXray", "chest", [
            S("right_lung", 0.30, 0.46, 0.15, 0.30, 45, angle=5, cycle=(0.84, 1.06, "apex")),
            S("left_lung", 0.70, 0.46, 0.14, 0.30, 45, angle=-5, cycle=(0.84, 1.06, "apex")),
            S("heart", 0.57, 0.64, 0.14, 0.12, 205, angle=-20),
            S("lung_nodule", 0.26, 0.34, 0.025, 0.025, 150, split=0.5, needs="right_lung",
              place=("right_lung", -0.55, 0.55, -0.75, -0.15, 0.8)),
        ]),
    ],
    "us": [
        ("SynthAbdomenUS", "fan", [
            S("liver", 0.45, 0.50, 0.28, 0.20, 115, angle=-10),
            S("gallbladder", 0.60, 0.62, 0.07, 0.045, 12, angle=20),
            S("right_kidney", 0.40, 0.74, 0.10, 0.06, 150, angle=-15),
        ]),
        ("SynthEchoUS", "fan", [
            S("left_ventricle", 0.56, 0.55, 0.09, 0.17, 18, angle=-10, cycle=(0.74, 1.0, "iso")),
            S("right_ventricle", 0.38, 0.55, 0.07, 0.14, 22, angle=10, cycle=(0.8, 1.0, "iso")),
        ]),
    ],
    "pathology": [
        ("SynthHistology", "stain", [
            S("gland", 0.35, 0.40, 0.16, 0.11, (215, 140, 185), angle=25, roam=(0.28, 0.72)),
            S("nucleus", 0.70, 0.68, 0.03, 0.025, (70, 35, 120), split=1.0, parts=3, roam=(0.14, 0.86)),
        ]),
    ],
    "dermoscopy": [
        ("SynthDermoscopy", "skin", [
            S("skin_lesion", 0.50, 0.50, 0.18, 0.14, (105, 65, 45), angle=30, split=0.4, roam=(0.36, 0.64)),
        ]),
    ],
    "fundus": [
        ("SynthFundus", "eye", [
            S("optic_disc", 0.70, 0.48, 0.06, 0.07, (250, 215, 140)),
            S("macula", 0.40, 0.52, 0.07, 0.07, (125, 40, 20)),
            S("hemorrhage", 0.35, 0.30, 0.03, 0.025, (85, 10, 10), split=0.6,
              place=("macula", -1.8, 1.8, -3.4, -1.6, None)),
        ]),
    ],
    "oct": [
        ("SynthOCT", "dark", [
            # far wider than the image: the retinal band spans every B-scan at any thickness
            S("retina", 0.50, 0.52, 1.0, 0.13, 165),
            S("fluid", 0.50, 0.52, 0.05, 0.035, 25, split=0.5, needs="retina",
              place=("retina", -0.18, 0.18, -0.35, 0.35, None)),
        ]),
    ],
}


# How a scene's patients and images differ (module docstring). Per patient: overall scale
# (body size x field-of-view zoom: lognormal around `scale[0]` with sigma `scale[1]`, clipped to
# [scale[2], scale[3]]), aspect (lognormal sigma: wider vs deeper), position in the field of view
# (normal sd per axis, clipped), rotation (uniform +-degrees), mirroring ("eye": left/right eye
# alternate per image; "random": per patient; None: never, the name has a side), each organ's own
# variation (`organ`: offset sd, size and aspect lognormal sigmas, angle sd in degrees; lesions
# use `lesion` as their size sigma). Per image (`view`): shift sd, zoom sigma, rotation +-degrees.
# `pivot` is the reference anatomy's centre (scaling and rotation are about it); `field` clips
# masks to the region the modality images (ultrasound fan, fundus aperture); `fit` keeps a
# (half-width, half-height) extent around the pivot inside the image (the head in a brain MR);
# `slab`: CT/MR volumes, whose slices sit at levels of the scanned slab.
def G(pivot=(0.5, 0.5), scale=(1.0, 0.13, 0.76, 1.32), aspect=0.05, shift=(0.06, 0.07, 0.12, 0.14),
      rotate=8.0, mirror=None, organ=(0.03, 0.13, 0.07, 8.0), lesion=0.25, view=(0.0, 0.0, 0.0),
      field=None, fit=None, slab=False):
    return dict(pivot=pivot, scale=scale, aspect=aspect, shift=shift, rotate=rotate, mirror=mirror,
                organ=organ, lesion=lesion, view=view, field=field, fit=fit, slab=slab)


GEOMETRY: dict[str, dict] = {
    "SynthAbdomenCT": G(pivot=(0.5, 0.52), slab=True),
    "SynthChestCT": G(pivot=(0.5, 0.52), slab=True),
    "SynthCardiacMR": G(pivot=(0.5, 0.52), rotate=15.0, slab=True),
    "SynthBrainMR": G(scale=(0.86, 0.11, 0.66, 1.05), shift=(0.08, 0.08, 0.18, 0.18), rotate=10.0,
                      fit=(0.40, 0.46), slab=True),
    "SynthAbdomenMR": G(pivot=(0.5, 0.52), slab=True),
    "SynthChestXray": G(pivot=(0.5, 0.52), scale=(1.0, 0.12, 0.78, 1.25), rotate=5.0),
    "SynthAbdomenUS": G(pivot=(0.5, 0.55), scale=(1.0, 0.15, 0.74, 1.35), shift=(0.07, 0.06, 0.14, 0.12),
                        rotate=20.0, view=(0.03, 0.06, 5.0), field="fan"),
    "SynthEchoUS": G(pivot=(0.5, 0.55), scale=(1.0, 0.12, 0.78, 1.25), shift=(0.07, 0.06, 0.14, 0.12),
                     rotate=15.0, view=(0.02, 0.03, 4.0), field="fan"),
    "SynthHistology": G(scale=(1.0, 0.15, 0.7, 1.4), aspect=0.08, rotate=180.0, mirror="random",
                        view=(0.0, 0.05, 180.0)),
    "SynthDermoscopy": G(scale=(1.0, 0.25, 0.6, 1.6), aspect=0.08, rotate=180.0, mirror="random",
                         view=(0.0, 0.06, 10.0)),
    "SynthFundus": G(scale=(1.0, 0.08, 0.85, 1.18), shift=(0.05, 0.05, 0.10, 0.10), mirror="eye",
                     organ=(0.01, 0.16, 0.05, 5.0), view=(0.03, 0.02, 3.0), field="eye"),
    "SynthOCT": G(pivot=(0.5, 0.52), scale=(1.0, 0.0, 1.0, 1.0), aspect=0.0, shift=(0.03, 0.10, 0.06, 0.2),
                  mirror="eye", organ=(0.0, 0.15, 0.0, 6.0), view=(0.015, 0.0, 1.0)),
}

# Per-modality structure checks happen at import: a scene may only use structures the vocabulary
# lists for that modality, so builders never emit a label the evaluator would reject.
for _mod, _scenes in SCENES.items():
    assert _mod in MODALITIES, _mod
    for _ds, _bg, _structs in _scenes:
        assert _ds in GEOMETRY, _ds
        _keys = [t["key"] for t in _structs]
        for _s in _structs:
            assert _mod in BY_KEY[_s["key"]].modalities, (_mod, _s["key"])
            for _ref in (_s["needs"], _s["anchor"], _s["place"] and _s["place"][0]):
                assert not _ref or _keys.index(_ref) != _keys.index(_s["key"]), (_ds, _s["key"])
            # a host is painted before the lesion clipped to it
            assert not (_s["needs"] and _s["place"]) or _keys.index(_s["needs"]) < _keys.index(_s["key"])


def _clip_normal(z, sd: float, lim: float | None = None):
    """sd * z clipped to +-lim (default 2 sd): bounded variation, never a wild outlier."""
    lim = 2 * sd if lim is None else lim
    return np.clip(sd * z, -lim, lim)


def _lognormal(z, sigma: float, lo: float = 0.0, hi: float = np.inf) -> float:
    return float(np.clip(np.exp(_clip_normal(z, sigma)), lo, hi))


class _Frame:
    """Reference anatomy -> image: mirror about the pivot, scale (x by s*a, y by s/a), rotate,
    translate. Angles in degrees, positive turning x toward y (clockwise on screen)."""

    def __init__(self, pivot, s=1.0, a=1.0, theta=0.0, t=(0.0, 0.0), mirror=False):
        self.px, self.py = pivot
        self.sx, self.sy = s * a, s / a
        self.theta, self.m = theta, -1.0 if mirror else 1.0
        self.cos, self.sin = np.cos(np.deg2rad(theta)), np.sin(np.deg2rad(theta))
        self.tx, self.ty = t

    def point(self, x, y):
        dx, dy = (x - self.px) * self.m * self.sx, (y - self.py) * self.sy
        return (self.px + self.tx + dx * self.cos - dy * self.sin,
                self.py + self.ty + dx * self.sin + dy * self.cos)

    def inverse(self, x, y):
        dx, dy = x - self.px - self.tx, y - self.py - self.ty
        u, v = dx * self.cos + dy * self.sin, -dx * self.sin + dy * self.cos
        return self.px + u / self.sx * self.m, self.py + v / self.sy

    def pose(self, cx, cy, rx, ry, angle):
        """An ellipse of the reference anatomy in image coordinates (radii scaled per axis)."""
        x, y = self.point(cx, cy)
        return (x, y, rx * self.sx, ry * self.sy, self.m * angle + self.theta)


def _section(level: float, z) -> float:
    """Cross-section of an organ spanning levels z[0] +- z[1], relative to its largest (0 outside)."""
    d = (level - z[0]) / z[1]
    return float(np.sqrt(1 - d * d)) if abs(d) < 1 else 0.0


def _patient(geo: dict, structs: list[dict], rng: np.random.Generator, slices: int) -> dict:
    """A patient's draws: frame, each structure's own variation, lesion positions, slice levels.
    Always the same number of draws in the same order, so the stream is stable."""
    z = rng.standard_normal(4)
    u = rng.random(2)
    centre, sigma, lo, hi = geo["scale"]
    s = centre * _lognormal(z[0], sigma, lo / centre, hi / centre)
    a = _lognormal(z[1], geo["aspect"])
    sdx, sdy, limx, limy = geo["shift"]
    tx, ty = float(_clip_normal(z[2], sdx, limx)), float(_clip_normal(z[3], sdy, limy))
    if geo["fit"]:  # keep the extent inside the image (with a margin of 1 % of the side)
        ex, ey = geo["fit"]
        mx, my = max(0.0, 0.49 - ex * s * a), max(0.0, 0.49 - ey * s / a)
        tx, ty = float(np.clip(tx, -mx, mx)), float(np.clip(ty, -my, my))
    theta = geo["rotate"] * (2 * u[0] - 1)
    organ = rng.standard_normal((len(structs), 5))
    place = rng.random((len(structs), PLACE_TRIES, 2))
    levels = np.sort(rng.random(slices))
    return dict(s=s, a=a, t=(tx, ty), theta=theta, mirror=geo["mirror"] == "random" and u[1] < 0.5,
                organ=organ, place=place, levels=levels)


def _placed(place, draws: np.ndarray) -> tuple[float, float]:
    """First candidate (u, v) of the box inside the allowed radius (else the last, pulled in)."""
    _, u0, u1, v0, v1, r = place
    uv = np.column_stack([u0 + (u1 - u0) * draws[:, 0], v0 + (v1 - v0) * draws[:, 1]])
    if r is None:
        return float(uv[0, 0]), float(uv[0, 1])
    inside = np.flatnonzero(np.hypot(uv[:, 0], uv[:, 1]) <= r)
    u, v = uv[inside[0]] if inside.size else uv[-1] * r / np.hypot(*uv[-1])
    return float(u), float(v)


def _poses(structs: list[dict], geo: dict, pat: dict, frame: _Frame, level: float, phase: float,
           rng: np.random.Generator) -> list[tuple | None]:
    """Each structure's ellipse (cx, cy, rx, ry, angle) in image fractions, or None where it is
    not in this image (outside its levels). Roaming structures draw their centres from `rng`."""
    index = {t["key"]: a for a, t in enumerate(structs)}
    od, size_sd, aspect_sd, angle_sd = geo["organ"]
    poses: list[tuple | None] = [None] * len(structs)
    roamed: list[tuple[float, float, float]] = []  # (cx, cy, reach) of structures placed so far
    for i, s in enumerate(structs):
        src = structs[index[s["anchor"]]] if s["anchor"] else s  # whose variation this one shares
        z = pat["organ"][index[src["key"]]]
        jit = src["jit"]
        angle = s["angle"] + float(_clip_normal(z[4], angle_sd * jit))
        if s["place"]:
            if s["gate"] and not s["gate"][0] <= level <= s["gate"][1]:
                continue
            ref = poses[index[s["place"][0]]]  # placed before it (checked at import)
            if ref is None:  # not at this level
                continue
            u, v = _placed(s["place"], pat["place"][i])
            rcx, rcy, rrx, rry, rang = ref
            ca, sa = np.cos(np.deg2rad(rang)), np.sin(np.deg2rad(rang))
            du, dv = frame.m * u * rrx, v * rry
            k = _lognormal(z[2], geo["lesion"], 0.6, 1.7)
            if s["needs"]:  # within its host: at most 0.9 of the host's smaller radius
                k = min(k, 0.9 * min(rrx, rry) / max(s["rx"] * frame.sx, s["ry"] * frame.sy))
            poses[i] = (rcx + du * ca - dv * sa, rcy + du * sa + dv * ca,
                        s["rx"] * k * frame.sx, s["ry"] * k * frame.sy, frame.m * angle + frame.theta)
            continue
        k = _lognormal(z[2], size_sd * jit)
        asp = _lognormal(z[3], aspect_sd * jit)
        rx, ry = s["rx"] * k * asp, s["ry"] * k / asp
        cx = src["cx"] + float(_clip_normal(z[0], od * jit))
        cy = src["cy"] + float(_clip_normal(z[1], od * jit))
        if geo["slab"]:
            f = 1.0 if src["z"] is None else _section(level, src["z"])
            if f < MIN_SECTION:
                continue
            rx, ry = rx * f, ry * f
            cx, cy = cx + src["drift"][0] * (level - 0.5), cy + src["drift"][1] * (level - 0.5)
        if src["cycle"]:
            lo, hi, mode = src["cycle"]
            f = lo + (hi - lo) * phase
            if mode == "apex":  # the top stays, the bottom moves (diaphragm)
                cy += (f - 1) * ry
                ry *= f
            else:
                rx, ry = rx * f, ry * f
        pose = frame.pose(cx, cy, rx, ry, angle)
        if s["roam"]:
            lo, hi = s["roam"]
            reach = max(pose[2], pose[3]) * (2.6 if s["split"] else 1.1)
            for _ in range(12):  # a new field of view: anywhere, apart from what is already there
                x, y = rng.uniform(lo, hi, 2)
                if all(np.hypot(x - px, y - py) > 1.05 * (reach + pr) for px, py, pr in roamed):
                    break
            roamed.append((x, y, reach))
            pose = (float(x), float(y)) + pose[2:]
        poses[i] = pose
    return poses


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return xx, yy


def _field(kind: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray | None:
    """Where the modality images at all (fixed to the device, not the patient), or None."""
    if kind == "fan":  # ultrasound sector from the top centre
        ang = np.arctan2(xx - 0.5, yy + 0.05)
        return (np.abs(ang) < 0.7) & (np.hypot(xx - 0.5, yy + 0.05) < 1.0)
    if kind == "eye":  # the camera's round aperture
        return ((xx - 0.5) / 0.47) ** 2 + ((yy - 0.5) / 0.47) ** 2 < 1
    return None


def _background(kind: str, size: int, rng: np.random.Generator, rgb: bool, frame: _Frame | None = None,
                scale: float = 1.0) -> np.ndarray:
    """Smooth, modality-typical background as float (H, W) or (H, W, 3). The patient's body
    (trunk, head, chest) follows `frame`, the head's outline shrinks with `scale` (slice level);
    the device's field (fan, aperture) and tissue or skin do not move."""
    xx, yy = _grid(size)
    gx, gy = rng.uniform(-15, 15, 2)
    ramp = gx * (xx - 0.5) + gy * (yy - 0.5)  # gentle illumination gradient
    bx, by = frame.inverse(xx, yy) if frame is not None and kind in ("body", "head", "chest") else (xx, yy)
    inside = lambda cx, cy, rx, ry: ((bx - cx) / rx) ** 2 + ((by - cy) / ry) ** 2 < 1  # noqa: E731
    if kind == "body":  # CT/MR trunk: soft-tissue ellipse on air
        img = np.where(inside(0.5, 0.52, 0.46, 0.40), 75.0, 5.0) + ramp
    elif kind == "head":  # skull ring around the brain
        img = np.where(inside(0.5, 0.5, 0.40 * scale, 0.46 * scale), 235.0, 5.0)
        img = np.where(inside(0.5, 0.5, 0.352 * scale, 0.412 * scale), 40.0, img) + ramp
    elif kind == "chest":  # radiograph: bright soft tissue, darker at the edges
        img = 170.0 - 60 * ((bx - 0.5) ** 2 + (by - 0.55) ** 2) * 4 + ramp
    elif kind == "fan":
        img = np.where(_field(kind, xx, yy), 70.0, 0.0) + ramp
    elif kind == "dark":  # OCT: dark vitreous
        img = 15.0 + ramp * 0.3
    elif kind == "stain":  # H&E pink
        img = np.stack([235 + ramp, 195 + ramp, 215 + ramp], -1)
    elif kind == "skin":
        img = np.stack([215 + ramp, 170 + ramp, 140 + ramp], -1)
    elif kind == "eye":  # orange retina disc on black
        disc = _field(kind, xx, yy)[..., None]
        img = np.where(disc, np.array([195.0, 85, 40]), 0.0) + ramp[..., None] * disc
    else:
        raise BadInput(f"unknown background kind {kind!r}")
    if rgb and img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    return img


def _blob(size: int, cx: float, cy: float, rx: float, ry: float, angle: float,
          hole: float, rng: np.random.Generator, wobble: float = 1.0) -> np.ndarray:
    """Boolean mask of a rotated ellipse with a slightly wobbly outline (organs are not ellipses)."""
    # Small lesions must survive low resolutions (the tiny profile renders 64-224 px).
    rx, ry = max(rx, MIN_RADIUS_PX / size), max(ry, MIN_RADIUS_PX / size)
    # Evaluate only the window that can contain the blob (outline wobble is under 10%): most
    # structures are small, and a full-image grid per blob dominated the run time.
    reach = 1.1 * max(rx, ry)
    x0, x1 = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 2)
    y0, y1 = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 2)
    full = np.zeros((size, size), bool)
    k, phase, amp = rng.integers(2, 5), rng.uniform(0, 2 * np.pi), wobble * rng.uniform(0.03, 0.09)
    if x0 >= x1 or y0 >= y1:  # entirely outside the image
        return full
    yy, xx = np.mgrid[y0:y1, x0:x1] / size
    t = np.deg2rad(angle)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / rx
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / ry
    d = np.hypot(u, v)
    theta = np.arctan2(v, u)
    edge = 1 + amp * np.sin(k * theta + phase)
    m = d < edge
    if hole:
        m &= d > hole * edge
    full[y0:y1, x0:x1] = m
    return full


def _structure_mask(s: dict, pose: tuple, size: int, rng: np.random.Generator, clip: np.ndarray | None) -> np.ndarray:
    """The structure's mask: one blob, or 2-3 separate foci; clipped (host, field); specks dropped."""
    cx, cy, rx, ry, angle = pose
    parts = s["parts"] if rng.random() < s["split"] else 1
    mask = np.zeros((size, size), bool)
    if parts == 1:
        mask |= _blob(size, cx, cy, rx, ry, angle, s["hole"], rng, s["wobble"])
    else:
        # Several separate foci: smaller blobs on a circle, spaced so they never touch
        # (centres >= 2.5 r apart while each blob reaches under 1 r from its centre).
        r = max(max(rx, ry) * 0.7, MIN_RADIUS_PX / size / 0.8)
        phi = rng.uniform(0, 2 * np.pi)
        dist = 1.5 * r if parts == 2 else 1.45 * r
        for p in range(parts):
            a = phi + 2 * np.pi * p / parts
            mask |= _blob(size, cx + dist * np.cos(a), cy + dist * np.sin(a), r * 0.9, r * 0.8,
                          angle, 0.0, rng)
    if clip is not None:
        mask &= clip
    # Drop specks (blobs clipped by the border, a host or the field, or tiny at low resolution):
    # the reader ignores components under its min pixel count, so they would be unlabeled paint.
    comp, n_comp = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)
    return (sizes >= MIN_COMPONENT_PIXELS)[comp] & mask


def _layout(dataset: str, structs: list[dict], pat: dict, slice_index: int, mirror: bool,
            rng: np.random.Generator) -> tuple[_Frame, float, list[tuple | None]]:
    """The slice's frame (the patient's, moved by this image's view), its slab level and every
    structure's pose (`_poses`). Draws the view, the phase and roaming centres from `rng`."""
    geo = GEOMETRY[dataset]
    shift_sd, zoom_sd, rot = geo["view"]
    zv = rng.standard_normal(3)
    phase = float(rng.random())
    vx, vy = _clip_normal(zv[0], shift_sd), _clip_normal(zv[1], shift_sd)
    zoom = _lognormal(zv[2], zoom_sd)
    spin = rot * (2 * float(rng.random()) - 1)
    frame = _Frame(geo["pivot"], pat["s"] * zoom, pat["a"], pat["theta"] + spin,
                   (pat["t"][0] + float(vx), pat["t"][1] + float(vy)), pat["mirror"] != mirror)
    level = float(pat["levels"][slice_index]) if geo["slab"] else 0.5
    return frame, level, _poses(structs, geo, pat, frame, level, phase, rng)


def _draw_scene(modality: str, dataset: str, kind: str, structs: list[dict], size: int,
                pat: dict, slice_index: int, mirror: bool, rng: np.random.Generator):
    """Return (image uint8, [(label key, mask bool)]) for one slice.

    `pat` is the patient (`_patient`: frame, each organ's variation, lesion positions and slice
    levels, shared by all its slices); `rng` is the slice's (view, phase, which structures
    appear, outlines, noise).
    """
    geo = GEOMETRY[dataset]
    rgb = modality in RGB_MODALITIES
    frame, level, poses = _layout(dataset, structs, pat, slice_index, mirror, rng)
    head = next((t for t in structs if t["key"] == "brain"), None) if kind == "head" else None
    img = _background(kind, size, rng, rgb, frame, _section(level, head["z"]) if head else 1.0)
    field = _field(geo["field"], *_grid(size)) if geo["field"] else None
    index = {t["key"]: a for a, t in enumerate(structs)}
    visible = [i for i, p in enumerate(poses) if p is not None
               and (not structs[i]["needs"] or poses[index[structs[i]["needs"]]] is not None)]
    n = len(visible)
    k = int(rng.integers(min(2, n), min(4, n) + 1)) if n else 0
    # Take visible structures in random order, each together with the one it needs (a lesion
    # its host organ, the myocardium ring its cavity), while the total stays within k; a
    # structure that leaves nothing on the image (outside it, the field or its host) is passed.
    masks: dict[int, np.ndarray] = {}

    def mask_of(i: int) -> np.ndarray:
        if i not in masks:
            s = structs[i]
            clip = field
            if s["needs"] and s["place"]:  # a lesion stays inside its host
                host = mask_of(index[s["needs"]])
                clip = host if clip is None else clip & host
            masks[i] = _structure_mask(s, poses[i], size, rng, clip)
        return masks[i]

    chosen: set[int] = set()
    for i in rng.permutation(visible).tolist():
        need = {i} | ({index[structs[i]["needs"]]} if structs[i]["needs"] else set())
        if len(chosen | need) <= k and all(mask_of(j).any() for j in sorted(need)):
            chosen |= need
    regions = []
    for i in sorted(chosen):  # painting order = table order (hosts before their lesions)
        value = np.asarray(structs[i]["value"], float) + rng.uniform(-8, 8)  # per-image contrast jitter
        img[masks[i]] = value
        regions.append((structs[i]["key"], masks[i]))
    # Soften edges, then add noise: speckle (multiplicative) for ultrasound, Gaussian elsewhere.
    sigma = (1.0, 1.0, 0) if rgb else 1.0
    img = ndimage.gaussian_filter(img, sigma=sigma)
    if modality == "us":
        img = img * rng.gamma(4.0, 0.25, img.shape)
    else:
        img = img + rng.normal(0, 6.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), regions


def _slice(modality: str, patient: int, slice_index: int, slices_per_patient: int, seed: int, pat=None):
    """(dataset, kind, structs, patient draws, mirrored, slice rng) of one slice."""
    mi = list(MODALITIES).index(modality)
    dataset, kind, structs = SCENES[modality][patient % len(SCENES[modality])]
    if pat is None:
        pat = _patient(GEOMETRY[dataset], structs, np.random.default_rng([seed, mi, patient]), slices_per_patient)
    # left and right eyes alternate over a patient's images (a no-op where mirroring is off)
    mirror = GEOMETRY[dataset]["mirror"] == "eye" and (patient + slice_index) % 2 == 1
    return dataset, kind, structs, pat, mirror, np.random.default_rng([seed, mi, patient, slice_index + 1])


def render(modality: str, patient: int, slice_index: int, slices_per_patient: int, image_size: int,
           seed: int) -> tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]:
    """(dataset, image, [(label, mask)]) of one slice, exactly as `generate` writes it."""
    dataset, kind, structs, pat, mirror, rng = _slice(modality, patient, slice_index, slices_per_patient, seed)
    img, regions = _draw_scene(modality, dataset, kind, structs, image_size, pat, slice_index, mirror, rng)
    return dataset, img, regions


def layout(modality: str, patient: int, slice_index: int, slices_per_patient: int,
           seed: int) -> tuple[str, float, dict[str, tuple[float, float, float, float, float]]]:
    """(dataset, slab level, {label: (cx, cy, rx, ry, angle)}) of one slice: the ellipse (image
    fractions, degrees) of every structure present at its level, whether `render` draws it or
    not (it draws 2-4 of them; lesions and split structures as several foci around it)."""
    dataset, _, structs, pat, mirror, rng = _slice(modality, patient, slice_index, slices_per_patient, seed)
    _, level, poses = _layout(dataset, structs, pat, slice_index, mirror, rng)
    return dataset, level, {s["key"]: p for s, p in zip(structs, poses) if p is not None}


def _save_png(path: Path, array: np.ndarray) -> None:
    # Fixed encoder options and no metadata chunks: identical input -> identical bytes. Level 1:
    # noisy scans barely compress at higher levels, which only cost time.
    Image.fromarray(array).save(path, format="PNG", compress_level=1, optimize=False)


def generate(root: Path, patients_per_modality: int, slices_per_patient: int, image_size: int,
             seed: int) -> dict:
    """Write the synthetic SA-Med2D-style dataset under `root` and return counts.

    The dataset is built in a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a half-written `root` behind.
    """
    root = Path(root)
    if patients_per_modality < 1 or slices_per_patient < 1 or image_size < 32:
        raise BadInput("need patients_per_modality >= 1, slices_per_patient >= 1, image_size >= 32")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    mapping: dict[str, list[str]] = {}
    class_mapping: dict[str, dict[str, int]] = {}
    summary: dict = {"images": {}, "masks": {}, "structures": {}}
    try:
        for modality in MODALITIES:  # dict order is fixed in vocab
            scenes = SCENES[modality]
            for dataset, _, structs in scenes:
                # Class ids follow the scene table, 0-based like the release's "--0000_001".
                class_mapping[dataset] = {s["key"]: c for c, s in enumerate(structs)}
            n_img = n_mask = 0
            for p in range(patients_per_modality):
                pat = None  # the patient's anatomy and slice levels, drawn once for all its slices
                for sl in range(slices_per_patient):
                    dataset, kind, structs, pat, mirror, rng = _slice(modality, p, sl, slices_per_patient, seed, pat)
                    img, regions = _draw_scene(modality, dataset, kind, structs, image_size, pat, sl,
                                               mirror, rng)
                    axis, number = ("z", 30 + 5 * sl) if modality in VOLUME_MODALITIES else ("x", sl)
                    stem = f"{modality}_00--{dataset}--patient{p:04d}--{axis}_{number:04d}"
                    _save_png(tmp / "images" / f"{stem}.png", img)
                    masks = []
                    for label, m in regions:
                        name = f"{stem}--{class_mapping[dataset][label]:04d}_001.png"
                        _save_png(tmp / "masks" / name, (m * 255).astype(np.uint8))
                        masks.append(f"masks/{name}")
                        summary["structures"][label] = summary["structures"].get(label, 0) + 1
                    mapping[f"images/{stem}.png"] = sorted(masks)
                    n_img += 1
                    n_mask += len(masks)
            summary["images"][modality] = n_img
            summary["masks"][modality] = n_mask
        for name, obj in ((MAPPING_FILE, mapping), (CLASS_MAPPING_FILE, class_mapping)):
            with (tmp / name).open("w", encoding="utf-8") as fh:
                json.dump(obj, fh, sort_keys=True, ensure_ascii=False, indent=1)
                fh.write("\n")
        # Swap in: move the old tree aside first, delete it only once the new one is in place.
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        if root.exists():
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["total_images"] = sum(summary["images"].values())
    summary["total_masks"] = sum(summary["masks"].values())
    return summary
