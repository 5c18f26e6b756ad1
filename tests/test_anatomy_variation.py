"""Realistic variation in the synthetic generator (issue 16): structures move and resize across
patients as real anatomy does (patient size and position, zoom, slice level, rotation, organ
shape and size, lesions anywhere plausible in their host), while anatomy stays consistent:
arrangement, left-right, lesions inside their host where the report puts them."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from medrega.sources import synthetic
from medrega.sources.samed2d import parse_image_name, parse_mask_name
from medrega.vocab import MODALITIES

# The aim: across patients a structure's box centre varies by >= 8 % of the image side
# (sd of x and y combined) and its width and height by >= 15 % of their mean (sd).
CENTRE_SD, SIZE_SD = 0.08, 0.15
# The OCT retina spans every B-scan: its width is the image's, by physics (its height varies).
FULL_WIDTH = {("SynthOCT", "retina")}


def ellipse_box(cx, cy, rx, ry, angle):
    """Tight box of a rotated ellipse, clipped to the image (fractions of the side)."""
    t = np.deg2rad(angle)
    hx, hy = np.hypot(rx * np.cos(t), ry * np.sin(t)), np.hypot(rx * np.sin(t), ry * np.cos(t))
    return np.clip([cx - hx, cy - hy, cx + hx, cy + hy], 0, 1)


def spread(boxes):
    """(centre sd, width sd / mean, height sd / mean) of (x0, y0, x1, y1) boxes."""
    a = np.asarray(boxes, float)
    cx, cy, w, h = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2, a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    return float(np.hypot(cx.std(), cy.std())), float(w.std() / w.mean()), float(h.std() / h.mean())


@pytest.fixture(scope="module")
def layouts():
    """(modality, patient, slice, dataset, level, poses) for 120 patients x 2 slices per modality."""
    return [(m, p, s, *synthetic.layout(m, p, s, 2, seed=0))
            for m in MODALITIES for p in range(120) for s in range(2)]


def test_anatomy_varies_per_structure(layouts):
    """Every structure of every scene, wherever it is present (drawn or not)."""
    boxes = defaultdict(list)
    for _, _, _, dataset, _, poses in layouts:
        for label, pose in poses.items():
            boxes[dataset, label].append(ellipse_box(*pose))
    every = {(ds, s["key"]) for scenes in synthetic.SCENES.values() for ds, _, structs in scenes for s in structs}
    assert set(boxes) == every
    assert all(len(b) >= 20 for b in boxes.values()), {k: len(b) for k, b in boxes.items()}
    failures = []
    for (dataset, label), b in sorted(boxes.items()):
        centre, w, h = spread(b)
        if (dataset, label) in FULL_WIDTH:
            assert all(x0 == 0 and x1 == 1 for x0, _, x1, _ in b), (dataset, label)
            w = SIZE_SD
        if centre < CENTRE_SD or h < SIZE_SD or w < SIZE_SD:
            failures.append(f"{dataset}/{label}: n {len(b)}, centre sd {centre:.3f}, width sd {w:.3f}, height sd {h:.3f}")
    assert not failures, "\n".join(failures)


SIZE = 160


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A small generated set: (image info, {label: mask}) per image."""
    root = tmp_path_factory.mktemp("anatomy") / "samed2d"
    synthetic.generate(root, patients_per_modality=12, slices_per_patient=2, image_size=SIZE, seed=0)
    mapping = json.loads((root / synthetic.MAPPING_FILE).read_text(encoding="utf-8"))
    classes = json.loads((root / synthetic.CLASS_MAPPING_FILE).read_text(encoding="utf-8"))
    images = []
    for rel, masks in sorted(mapping.items()):
        info = parse_image_name(rel)
        number = int(info["slice"])  # generate names volume slices z_0030, z_0035, ...; 2D ones x_0000, ...
        info["slice_index"] = (number - 30) // 5 if info["axis"] == "z" else number
        inverse = {v: k for k, v in classes[info["dataset"]].items()}
        stem = rel.rsplit("/", 1)[1][:-4]
        regions = {inverse[parse_mask_name(m, stem)[0]]: np.asarray(Image.open(root / m)) > 0 for m in masks}
        images.append((info, regions))
    return root, images


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_drawn_boxes_follow_the_anatomy(drawn):
    """Each drawn mask's box is its structure's ellipse of `layout` (so the drawn boxes vary as
    the anatomy does): IoU >= 0.6 for structures drawn whole (one focus, not clipped to a host or
    an imaging field); the others (foci, clipped lesions) are centred within that ellipse's box."""
    _, images = drawn
    table = {(ds, s["key"]): s for scenes in synthetic.SCENES.values() for ds, _, structs in scenes for s in structs}
    whole = 0
    for info, regions in images:
        patient = int(info["patient"].removeprefix("patient"))
        dataset, _, poses = synthetic.layout(info["modality"], patient, info["slice_index"], 2, seed=0)
        assert dataset == info["dataset"]
        for label, mask in regions.items():
            ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            box = (xs[0] / SIZE, ys[0] / SIZE, (xs[-1] + 1) / SIZE, (ys[-1] + 1) / SIZE)
            expected = ellipse_box(*poses[label])
            s = table[dataset, label]
            if not s["split"] and not s["place"] and not synthetic.GEOMETRY[dataset]["field"]:
                assert _iou(box, expected) >= 0.6, (info, label, box, expected)
                whole += 1
            else:
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                pad = 2 * max(poses[label][2:4])  # foci sit around the centre
                assert expected[0] - pad <= cx <= expected[2] + pad and expected[1] - pad <= cy <= expected[3] + pad
    assert whole > 150


def test_masks_inside_image_and_lesions_inside_host(drawn):
    _, images = drawn
    hosted = {s["key"]: s["needs"] for scenes in synthetic.SCENES.values() for _, _, structs in scenes
              for s in structs if s["needs"] and s["place"]}
    seen = set()
    for info, regions in images:
        for label, mask in regions.items():
            assert mask.shape == (SIZE, SIZE) and mask.sum() >= synthetic.MIN_COMPONENT_PIXELS, (info, label)
            if label in hosted:
                host = regions[hosted[label]]  # a lesion is never drawn without its host ...
                assert not (mask & ~host).any(), (info, label)  # ... and never outside it
                seen.add(label)
    assert seen == set(hosted)


def test_render_is_what_generate_writes(drawn):
    root, _ = drawn
    dataset, img, regions = synthetic.render("fundus", 5, 1, 2, SIZE, seed=0)
    stem = f"fundus_00--{dataset}--patient0005--x_0001"
    assert (np.asarray(Image.open(root / "images" / f"{stem}.png")) == img).all()
    again = synthetic.render("fundus", 5, 1, 2, SIZE, seed=0)
    assert (again[1] == img).all() and [k for k, _ in again[2]] == [k for k, _ in regions]
    assert synthetic.layout("ct", 7, 0, 2, 0) == synthetic.layout("ct", 7, 0, 2, 0)


def test_left_right_stays_anatomical(layouts):
    """CT, MR, X-ray: the patient's right on the image's left, in every image (never mirrored).
    Fundus: left and right eyes alternate, the optic disc on the nasal side of the macula."""
    pairs = [("liver", "spleen"), ("right_lung", "left_lung"), ("right_kidney", "left_kidney")]
    compared = 0
    eyes = set()
    for modality, patient, slice_index, _, _, poses in layouts:
        if modality in ("ct", "mr", "xray"):
            for right, left in pairs:
                if right in poses and left in poses:
                    assert poses[right][0] < poses[left][0], (modality, patient, slice_index, right)
                    compared += 1
        if modality == "fundus":
            right_eye = poses["optic_disc"][0] > poses["macula"][0]
            assert right_eye == ((patient + slice_index) % 2 == 0)
            eyes.add(right_eye)
    assert compared > 300 and eyes == {True, False}


def test_slice_level_decides_which_organs_and_how_large(layouts):
    """Kidneys only low in the abdomen, stomach and spleen only high, the heart only low in the
    chest; an organ's cross-section is largest mid-extent."""
    levels = defaultdict(list)
    kidney = []
    for _, _, _, dataset, level, poses in layouts:
        for label, pose in poses.items():
            levels[dataset, label].append(level)
        if dataset == "SynthAbdomenCT" and "right_kidney" in poses:
            kidney.append((level, poses["right_kidney"][2] * poses["right_kidney"][3]))
    assert min(levels["SynthAbdomenCT", "right_kidney"]) > 0.45
    assert max(levels["SynthAbdomenCT", "stomach"]) < 0.6 and max(levels["SynthAbdomenCT", "spleen"]) < 0.6
    assert min(levels["SynthChestCT", "heart"]) > 0.35
    assert max(levels["SynthAbdomenCT", "liver"]) < 0.75  # the liver ends, the aorta runs on
    assert len(levels["SynthAbdomenCT", "aorta"]) == 120
    lv, area = np.asarray(kidney).T
    mid, ends = area[np.abs(lv - 0.76) < 0.1], area[np.abs(lv - 0.76) > 0.2]
    assert mid.mean() > 1.3 * ends.mean()


def _host_frame(lesion, host):
    """The lesion's centre in its host's frame: (u along the host's x radius, v), in radii."""
    (x, y, *_), (hx, hy, rx, ry, angle) = lesion, host
    t = np.deg2rad(angle)
    return ((x - hx) * np.cos(t) + (y - hy) * np.sin(t)) / rx, (-(x - hx) * np.sin(t) + (y - hy) * np.cos(t)) / ry


def test_lesions_where_the_reports_say(layouts):
    """medrega.sources.findings: liver tumours in the right lobe, pancreatic cancer in the tail,
    brain tumours in the right frontal lobe, X-ray nodules in the upper zone, CT nodules at upper
    levels, haemorrhages above the macula, fluid in the central retina; anywhere within that."""
    where = defaultdict(list)
    for modality, _, _, dataset, level, poses in layouts:
        for lesion, host in (("liver_tumor", "liver"), ("pancreatic_cancer", "pancreas"), ("kidney_tumor", "left_kidney"),
                             ("brain_tumor", "brain"), ("lung_nodule", "right_lung"), ("fluid", "retina"),
                             ("hemorrhage", "macula")):
            if lesion in poses:
                u, v = _host_frame(poses[lesion], poses[host])
                where[modality, lesion].append((u, v, level, poses[lesion][1] - poses[host][1]))
    for (modality, lesion), rows in where.items():
        u, v, level, dy = np.asarray(rows).T
        assert np.hypot(u, v).max() <= 0.8 or lesion in ("fluid", "hemorrhage"), (modality, lesion)
        if lesion == "liver_tumor":  # right lobe: the image-left part (patient's right)
            assert u.max() <= 0.15 and u.min() < -0.5
        if lesion == "pancreatic_cancer":  # tail: towards the spleen, image right
            assert u.min() >= 0.3
        if lesion == "brain_tumor":  # right frontal: image left, anterior (up)
            assert u.max() < 0 and v.max() < 0
        if (modality, lesion) == ("xray", "lung_nodule"):  # upper zone
            assert v.max() < 0
        if (modality, lesion) == ("ct", "lung_nodule"):  # upper lobe: upper levels
            assert level.max() <= 0.55
        if lesion == "hemorrhage":  # above the macula
            assert dy.max() < 0
        if lesion == "fluid":  # central retina
            assert np.abs(u).max() <= 0.18
        # anywhere plausible: spread over the allowed part, not one spot
        assert np.ptp(u) > 0.3 and np.ptp(v) > 0.3, (modality, lesion)
