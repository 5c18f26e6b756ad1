"""Deterministic synthetic scans in the SA-Med2D-20M layout (the embedded default raw data).

Layout written under `root` (mirrors the real release so one reader serves both):

    root/images/ct_00--SynthAbdomenCT--patient0002--z_0030.png
    root/masks/ct_00--SynthAbdomenCT--patient0002--z_0030--0000_001.png
    root/SAMed2D_v1.json                 {"images/<img>.png": ["masks/<mask>.png", ...]}
    root/SAMed2D_v1_class_mapping_id.json  {"<dataset>": {"<label>": <class id>, ...}}

Mask names are `{image stem}--{class id:04d}_{instance:03d}.png`; the class id is looked up in
the class mapping of the image's dataset, whose labels are vocabulary keys (medrega.vocab).

Each image is a smooth background plus 2-4 filled blobs (1-2 where the vocabulary offers fewer
structures for the modality: dermoscopy has one) at plausible, modality-specific positions, each with its own mean
intensity plus noise, so a tiny model can learn to name and locate them. Some structures (lesions,
nuclei) are drawn as 2-3 separate components so "one box per connected component" matters.
Everything is seeded per (seed, modality, patient, slice): re-running gives byte-identical files.
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

# One structure in a scene: centre and radii as fractions of the image side (x to the right,
# y down; radiological convention, so the patient's right is on the image's left), rotation in
# degrees, fill value (gray or RGB), how often it is split into several components, and a hole
# (inner radius fraction) for ring-shaped structures such as the myocardium, and the structure
# it is never drawn without (`needs`: a lesion's host organ).
def S(key, cx, cy, rx, ry, value, angle=0.0, split=0.0, parts=2, hole=0.0, needs=None):
    return dict(key=key, cx=cx, cy=cy, rx=rx, ry=ry, value=value, angle=angle, split=split,
                parts=parts, hole=hole, needs=needs)


# modality -> list of (dataset, background kind, structures in painting order: hosts before the
# lesions drawn inside them). Patient p of a modality belongs to scene p % len(scenes).
SCENES: dict[str, list[tuple[str, str, list[dict]]]] = {
    "ct": [
        ("SynthAbdomenCT", "body", [
            S("liver", 0.32, 0.42, 0.17, 0.14, 150, angle=-20),
            S("spleen", 0.74, 0.44, 0.07, 0.10, 130, angle=15),
            S("stomach", 0.60, 0.32, 0.10, 0.07, 95),
            S("gallbladder", 0.36, 0.58, 0.04, 0.03, 55),
            S("pancreas", 0.56, 0.52, 0.11, 0.035, 120, angle=-10),
            S("aorta", 0.50, 0.64, 0.035, 0.035, 215),
            S("right_kidney", 0.36, 0.72, 0.055, 0.075, 185),
            S("left_kidney", 0.64, 0.72, 0.055, 0.075, 185),
            S("liver_tumor", 0.28, 0.40, 0.035, 0.03, 90, split=0.5, needs="liver"),
            S("kidney_tumor", 0.64, 0.70, 0.025, 0.025, 110, needs="left_kidney"),
            S("pancreatic_cancer", 0.62, 0.52, 0.025, 0.02, 75, needs="pancreas"),
        ]),
        ("SynthChestCT", "body", [
            S("right_lung", 0.30, 0.48, 0.16, 0.26, 20),
            S("left_lung", 0.70, 0.48, 0.15, 0.26, 20),
            S("heart", 0.56, 0.58, 0.12, 0.10, 140, angle=-25),
            S("aorta", 0.50, 0.30, 0.035, 0.035, 215),
            S("lung_nodule", 0.26, 0.36, 0.025, 0.025, 170, split=0.5, needs="right_lung"),
        ]),
    ],
    "mr": [
        ("SynthCardiacMR", "body", [
            S("myocardium", 0.58, 0.50, 0.13, 0.13, 70, hole=0.72, needs="left_ventricle"),
            S("left_ventricle", 0.58, 0.50, 0.092, 0.092, 210),
            S("right_ventricle", 0.38, 0.46, 0.08, 0.12, 185, angle=10),
        ]),
        ("SynthBrainMR", "head", [
            S("brain", 0.50, 0.50, 0.34, 0.40, 130),
            S("brain_tumor", 0.40, 0.38, 0.06, 0.05, 225, split=0.5, needs="brain"),
        ]),
        ("SynthAbdomenMR", "body", [
            S("liver", 0.32, 0.42, 0.17, 0.14, 115, angle=-20),
            S("spleen", 0.74, 0.44, 0.07, 0.10, 160, angle=15),
            S("gallbladder", 0.36, 0.58, 0.04, 0.03, 235),
            S("right_kidney", 0.36, 0.72, 0.055, 0.075, 190),
            S("left_kidney", 0.64, 0.72, 0.055, 0.075, 190),
            S("liver_tumor", 0.28, 0.40, 0.035, 0.03, 200, split=0.5, needs="liver"),
        ]),
    ],
    "xray": [
        ("SynthChestXray", "chest", [
            S("right_lung", 0.30, 0.46, 0.15, 0.30, 45, angle=5),
            S("left_lung", 0.70, 0.46, 0.14, 0.30, 45, angle=-5),
            S("heart", 0.57, 0.64, 0.14, 0.12, 205, angle=-20),
            S("lung_nodule", 0.26, 0.34, 0.025, 0.025, 150, split=0.5, needs="right_lung"),
        ]),
    ],
    "us": [
        ("SynthAbdomenUS", "fan", [
            S("liver", 0.45, 0.50, 0.28, 0.20, 115, angle=-10),
            S("gallbladder", 0.60, 0.62, 0.07, 0.045, 12, angle=20),
            S("right_kidney", 0.40, 0.74, 0.10, 0.06, 150, angle=-15),
        ]),
        ("SynthEchoUS", "fan", [
            S("left_ventricle", 0.56, 0.55, 0.09, 0.17, 18, angle=-10),
            S("right_ventricle", 0.38, 0.55, 0.07, 0.14, 22, angle=10),
        ]),
    ],
    "pathology": [
        ("SynthHistology", "stain", [
            S("gland", 0.35, 0.40, 0.16, 0.11, (215, 140, 185), angle=25),
            S("nucleus", 0.70, 0.68, 0.03, 0.025, (70, 35, 120), split=1.0, parts=3),
        ]),
    ],
    "dermoscopy": [
        ("SynthDermoscopy", "skin", [
            S("skin_lesion", 0.50, 0.50, 0.18, 0.14, (105, 65, 45), angle=30, split=0.4),
        ]),
    ],
    "fundus": [
        ("SynthFundus", "eye", [
            S("optic_disc", 0.70, 0.48, 0.06, 0.07, (250, 215, 140)),
            S("macula", 0.40, 0.52, 0.07, 0.07, (125, 40, 20)),
            S("hemorrhage", 0.35, 0.30, 0.03, 0.025, (85, 10, 10), split=0.6),
        ]),
    ],
    "oct": [
        ("SynthOCT", "dark", [
            S("retina", 0.50, 0.52, 0.47, 0.13, 165),
            S("fluid", 0.50, 0.52, 0.05, 0.035, 25, split=0.5, needs="retina"),
        ]),
    ],
}

# Per-modality structure checks happen at import: a scene may only use structures the vocabulary
# lists for that modality, so builders never emit a label the evaluator would reject.
for _mod, _scenes in SCENES.items():
    assert _mod in MODALITIES, _mod
    for _ds, _bg, _structs in _scenes:
        for _s in _structs:
            assert _mod in BY_KEY[_s["key"]].modalities, (_mod, _s["key"])


def _background(kind: str, size: int, rng: np.random.Generator, rgb: bool) -> np.ndarray:
    """Smooth, modality-typical background as float (H, W) or (H, W, 3)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    gx, gy = rng.uniform(-15, 15, 2)
    ramp = gx * (xx - 0.5) + gy * (yy - 0.5)  # gentle illumination gradient
    inside = lambda cx, cy, rx, ry: ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1  # noqa: E731
    if kind == "body":  # CT/MR trunk: soft-tissue ellipse on air
        img = np.where(inside(0.5, 0.52, 0.46, 0.40), 75.0, 5.0) + ramp
    elif kind == "head":  # skull ring around the brain
        img = np.where(inside(0.5, 0.5, 0.40, 0.46), 235.0, 5.0)
        img = np.where(inside(0.5, 0.5, 0.36, 0.42), 40.0, img) + ramp
    elif kind == "chest":  # radiograph: bright soft tissue, darker at the edges
        img = 170.0 - 60 * ((xx - 0.5) ** 2 + (yy - 0.55) ** 2) * 4 + ramp
    elif kind == "fan":  # ultrasound sector from the top centre
        ang = np.arctan2(xx - 0.5, yy + 0.05)
        rad = np.hypot(xx - 0.5, yy + 0.05)
        img = np.where((np.abs(ang) < 0.7) & (rad < 1.0), 70.0, 0.0) + ramp
    elif kind == "dark":  # OCT: dark vitreous
        img = 15.0 + ramp * 0.3
    elif kind == "stain":  # H&E pink
        img = np.stack([235 + ramp, 195 + ramp, 215 + ramp], -1)
    elif kind == "skin":
        img = np.stack([215 + ramp, 170 + ramp, 140 + ramp], -1)
    elif kind == "eye":  # orange retina disc on black
        disc = inside(0.5, 0.5, 0.47, 0.47)[..., None]
        img = np.where(disc, np.array([195.0, 85, 40]), 0.0) + ramp[..., None] * disc
    else:
        raise BadInput(f"unknown background kind {kind!r}")
    if rgb and img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    return img


def _blob(size: int, cx: float, cy: float, rx: float, ry: float, angle: float,
          hole: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a rotated ellipse with a slightly wobbly outline (organs are not ellipses)."""
    # Small lesions must survive low resolutions (the tiny profile renders 64-224 px).
    rx, ry = max(rx, MIN_RADIUS_PX / size), max(ry, MIN_RADIUS_PX / size)
    # Evaluate only the window that can contain the blob (outline wobble is under 10%): most
    # structures are small, and a full-image grid per blob dominated the run time.
    reach = 1.1 * max(rx, ry)
    x0, x1 = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 2)
    y0, y1 = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 2)
    full = np.zeros((size, size), bool)
    if x0 >= x1 or y0 >= y1:  # entirely outside the image
        return full
    yy, xx = np.mgrid[y0:y1, x0:x1] / size
    t = np.deg2rad(angle)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / rx
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / ry
    d = np.hypot(u, v)
    theta = np.arctan2(v, u)
    k, phase, amp = rng.integers(2, 5), rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.09)
    edge = 1 + amp * np.sin(k * theta + phase)
    m = d < edge
    if hole:
        m &= d > hole * edge
    full[y0:y1, x0:x1] = m
    return full


def _draw_scene(modality: str, kind: str, structs: list[dict], size: int,
                jit: np.ndarray, rng: np.random.Generator):
    """Return (image uint8, [(label key, mask bool)]) for one slice.

    `jit` is the patient's anatomy (position/size/angle jitter per structure in [-1, 1], shared
    by all its slices); `rng` is the slice's (which structures appear, outlines, noise).
    """
    rgb = modality in RGB_MODALITIES
    img = _background(kind, size, rng, rgb)
    n = len(structs)
    k = int(rng.integers(min(2, n), min(4, n) + 1))
    # Take structures in random order, each together with the one it needs (a lesion its host
    # organ, the myocardium ring its cavity), while the total stays within k.
    index = {t["key"]: a for a, t in enumerate(structs)}
    chosen: set[int] = set()
    for i in rng.permutation(n).tolist():
        need = {i} | ({index[structs[i]["needs"]]} if structs[i]["needs"] else set())
        if len(chosen | need) <= k:
            chosen |= need
    chosen = sorted(chosen)  # painting order = table order (hosts before their lesions)
    regions = []
    for i in chosen:
        s = structs[i]
        cx = s["cx"] + 0.03 * jit[i, 0]
        cy = s["cy"] + 0.03 * jit[i, 1]
        scale = 1 + 0.12 * jit[i, 2]
        angle = s["angle"] + 12 * jit[i, 3]
        if s["key"] == "left_ventricle":  # concentric with the myocardium ring
            j = next((a for a, t in enumerate(structs) if t["key"] == "myocardium"), None)
            if j is not None:
                cx, cy = s["cx"] + 0.03 * jit[j, 0], s["cy"] + 0.03 * jit[j, 1]
                scale = 1 + 0.12 * jit[j, 2]
        rx, ry = s["rx"] * scale, s["ry"] * scale
        parts = s["parts"] if rng.random() < s["split"] else 1
        mask = np.zeros((size, size), bool)
        if parts == 1:
            mask |= _blob(size, cx, cy, rx, ry, angle, s["hole"], rng)
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
        # Drop specks (blobs clipped by the border, or tiny at low resolution): the reader
        # ignores components under its min pixel count, so they would be unlabeled paint.
        comp, n_comp = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)
        mask = (sizes >= MIN_COMPONENT_PIXELS)[comp] & mask
        if not mask.any():
            continue
        value = np.asarray(s["value"], float) + rng.uniform(-8, 8)  # per-image contrast jitter
        img[mask] = value
        regions.append((s["key"], mask))
    # Soften edges, then add noise: speckle (multiplicative) for ultrasound, Gaussian elsewhere.
    sigma = (1.0, 1.0, 0) if rgb else 1.0
    img = ndimage.gaussian_filter(img, sigma=sigma)
    if modality == "us":
        img = img * rng.gamma(4.0, 0.25, img.shape)
    else:
        img = img + rng.normal(0, 6.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), regions


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
        for mi, modality in enumerate(MODALITIES):  # dict order is fixed in vocab
            scenes = SCENES[modality]
            for dataset, _, structs in scenes:
                # Class ids follow the scene table, 0-based like the release's "--0000_001".
                class_mapping[dataset] = {s["key"]: c for c, s in enumerate(structs)}
            n_img = n_mask = 0
            for p in range(patients_per_modality):
                dataset, kind, structs = scenes[p % len(scenes)]
                # One jitter row per structure of the scene, drawn for all so the stream is stable.
                jit = np.random.default_rng([seed, mi, p]).uniform(-1, 1, (len(structs), 4))
                for sl in range(slices_per_patient):
                    rng = np.random.default_rng([seed, mi, p, sl + 1])
                    img, regions = _draw_scene(modality, kind, structs, image_size, jit, rng)
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
