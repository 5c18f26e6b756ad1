"""How much do structures move and resize across patients in the embedded data, and how good is
the mean-box prior there? The generator as it is against a baseline generator, in one run.

    baseline  medrega/sources/synthetic.py at --baseline-ref (default: the commit before the
              anatomical variation, organs jittered by +-3 % of the image), loaded from git
    current   medrega/sources/synthetic.py of this checkout

For each, on the same settings (default: the pipeline's 48 patients x 2 slices x 8 modalities at
224 px, seed 0): generation time (best of --repeats runs, the two generators alternating; wall
and CPU seconds, CPU being the steadier figure on a shared machine); per structure of each scene, over all its images, the box of
the whole mask (every component; what "where is X" points at): the standard deviation and 5-95 %
range of its centre (x, y) as a share of the image side, `centre` = sqrt(sd_x^2 + sd_y^2), and the
standard deviation of its width, height and size (sqrt(w h)), each relative to its mean; and,
unless --no-prior, the Text-to-Region mean-box prior (medrega.metrics.baselines.PriorBaseline,
fitted on the train split, scored on every held-out T2R item as benchmarks/learning.py scores it).

Run:  .venv/bin/python benchmarks/anatomy_variation.py   (about 1-2 min on 2 cores)
Writes artifacts/benchmarks/anatomy_variation.json (--out).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medrega import io  # noqa: E402
from medrega import config  # noqa: E402
from medrega.sources import synthetic  # noqa: E402
from medrega.sources.samed2d import CLASS_MAPPING_FILE, MAPPING_FILE, parse_image_name  # noqa: E402

# The commit this variation was built on: its generator jitters organs by +-3 % of the image.
BASELINE_REF = "8a45365e3f0ffa7ecd96f2f2361a9832db06c618"
GENERATOR = "medrega/sources/synthetic.py"


def load_baseline(ref: str, tmp: Path):
    """The generator module as it was at `ref` (git show), imported under its own name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{GENERATOR}"], check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "synthetic_baseline.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("synthetic_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def structure_boxes(root: Path) -> dict[tuple[str, str], list[tuple[float, float, float, float]]]:
    """(dataset, label) -> [(cx, cy, w, h) as shares of the image side], one per image, from the
    tight box of the whole mask."""
    mapping = json.loads((root / MAPPING_FILE).read_text(encoding="utf-8"))
    classes = json.loads((root / CLASS_MAPPING_FILE).read_text(encoding="utf-8"))
    out: dict[tuple[str, str], list] = {}
    for rel, masks in sorted(mapping.items()):
        dataset = parse_image_name(rel)["dataset"]
        inverse = {v: k for k, v in classes[dataset].items()}
        for m in masks:
            label = inverse[int(m.rsplit("--", 1)[1][:4])]
            with Image.open(root / m) as im:
                x0, y0, x1, y1 = im.getbbox()
                w, h = im.size
            out.setdefault((dataset, label), []).append(((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h))
    return out


def variation(boxes: list[tuple[float, float, float, float]]) -> dict:
    """Spread of the boxes' centres (share of the image side) and sizes (relative to the mean)."""
    a = np.asarray(boxes, float)
    cx, cy, w, h = a.T
    size = np.sqrt(w * h)
    q = lambda v: [float(x) for x in np.percentile(v, [5, 95])]  # noqa: E731
    return {
        "n": len(a),
        "cx_sd": float(cx.std()), "cy_sd": float(cy.std()), "centre_sd": float(np.hypot(cx.std(), cy.std())),
        "cx_5_95": q(cx), "cy_5_95": q(cy),
        "w_rel_sd": float(w.std() / w.mean()), "h_rel_sd": float(h.std() / h.mean()),
        "size_rel_sd": float(size.std() / size.mean()),
        "w_rel_5_95": q(w / w.mean()), "h_rel_5_95": q(h / h.mean()),
    }


def prior_t2r(root: Path, work: Path, params: config.Config) -> dict:
    """Held-out T2R figures of the mean-box prior on the records materialized from `root`."""
    import tasks.materialize as mat
    from medrega.metrics.baselines import PriorBaseline
    from medrega.metrics.scoring import score_samples, summarise
    from model.data import iter_records
    from tasks.evaluate import scorer, test_items

    # only what the prior needs (captions stay: the tiny pretraining's phases name them)
    p = params.merged({"materialize": {"tasks": ["caption", "r2t", "t2r"]}, "tune": {"tasks": ["r2t", "t2r"]},
                       "evaluate": {"tasks": ["t2r"]}, "register": {"gate": {"metrics": ["t2r.region_f1"]}}})
    out = work / "instructions"
    mat.materialize(root, out, p)
    prior = PriorBaseline(r for r, _ in iter_records(out / "meta_file.json", ["r2t", "t2r"]))
    items = test_items(out / "meta_test.json", ["t2r"], -1, params.seed)
    s = scorer(params.evaluate)
    rows = score_samples([{**i, "prediction": prior.answer(i)} for i in items], scorer=s)
    t2r = summarise(rows, s)["t2r"]
    return {"items": len(items), **{k: t2r[k] for k in ("mean_iou", "region_f1", "object_f1", "acc@0.5")},
            "mean_iou_by_modality": {m: v["mean_iou"] for m, v in t2r["by"]["by_modality"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--patients", type=int, help="per modality (default: data.patients_per_modality)")
    ap.add_argument("--slices", type=int, help="per patient (default: data.slices_per_patient)")
    ap.add_argument("--size", type=int, help="image side in px (default: data.image_size)")
    ap.add_argument("--seed", type=int, help="default: data.seed")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git revision of the baseline generator")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per generator, alternating")
    ap.add_argument("--no-prior", action="store_true", help="skip materializing and scoring the prior")
    ap.add_argument("--out", default="artifacts/benchmarks/anatomy_variation.json")
    a = ap.parse_args()
    params = config.resolve(a.params)
    d = params.data
    settings = dict(patients_per_modality=a.patients or d.patients_per_modality,
                    slices_per_patient=a.slices or d.slices_per_patient,
                    image_size=a.size or d.image_size, seed=d.seed if a.seed is None else a.seed)
    print(f"settings: {settings}, baseline {a.baseline_ref[:12]}", flush=True)
    results: dict = {"settings": settings, "baseline_ref": a.baseline_ref, "generators": {}}
    with tempfile.TemporaryDirectory(prefix="anatomy-") as tmp:
        tmp = Path(tmp)
        generators = {"baseline": load_baseline(a.baseline_ref, tmp), "current": synthetic}
        wall: dict[str, list[float]] = {name: [] for name in generators}
        cpu: dict[str, list[float]] = {name: [] for name in generators}
        summaries = {}
        for _ in range(max(1, a.repeats)):
            for name, module in generators.items():
                t, c = time.perf_counter(), time.process_time()
                summaries[name] = module.generate(tmp / name / "samed2d", **settings)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        for name in generators:
            root, summary = tmp / name / "samed2d", summaries[name]
            print(f"{name}: generated {summary['total_images']} images, {summary['total_masks']} masks "
                  f"in {min(wall[name]):.2f} s ({min(cpu[name]):.2f} s CPU), best of {len(wall[name])}", flush=True)
            stats = {f"{ds}/{label}": variation(b) for (ds, label), b in sorted(structure_boxes(root).items())}
            entry = {"seconds": min(wall[name]), "cpu_seconds": min(cpu[name]), "runs_seconds": wall[name],
                     "images": summary["total_images"], "masks": summary["total_masks"], "structures": stats}
            if not a.no_prior:
                entry["prior_t2r"] = prior_t2r(root, tmp / name, params)
                print(f"{name}: prior T2R mean IoU {entry['prior_t2r']['mean_iou']:.3f} over "
                      f"{entry['prior_t2r']['items']} held-out items", flush=True)
            results["generators"][name] = entry

    base, cur = results["generators"]["baseline"], results["generators"]["current"]
    print("\nPer structure (dataset/label), across patients: centre sd as a share of the image side "
          "(x, y, combined), 5-95 % range of the centre, sd of width/height/size relative to the mean; "
          "baseline -> current.\n")
    print("| structure | n | centre sd x | centre sd y | centre sd | cx 5-95 % | cy 5-95 % "
          "| width sd | height sd | size sd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(base["structures"]) | set(cur["structures"])):
        b, c = base["structures"].get(key), cur["structures"].get(key)
        if b is None or c is None:
            print(f"| {key} | only in {'current' if b is None else 'baseline'} |")
            continue
        arrow = lambda k: f"{b[k]:.3f} -> {c[k]:.3f}"  # noqa: E731
        rng = lambda k: f"{b[k][1] - b[k][0]:.2f} -> {c[k][1] - c[k][0]:.2f}"  # noqa: E731
        print(f"| {key} | {b['n']} / {c['n']} | {arrow('cx_sd')} | {arrow('cy_sd')} | {arrow('centre_sd')} "
              f"| {rng('cx_5_95')} | {rng('cy_5_95')} | {arrow('w_rel_sd')} | {arrow('h_rel_sd')} "
              f"| {arrow('size_rel_sd')} |")
    for label, k in (("centre sd", "centre_sd"), ("size sd", "size_rel_sd")):
        bs = [v[k] for v in base["structures"].values()]
        cs = [v[k] for v in cur["structures"].values()]
        print(f"\n{label}: baseline min {min(bs):.3f} median {np.median(bs):.3f}; "
              f"current min {min(cs):.3f} median {np.median(cs):.3f}", end="")
    print(f"\n\ngeneration: baseline {base['seconds']:.2f} s ({base['cpu_seconds']:.2f} s CPU), current "
          f"{cur['seconds']:.2f} s ({cur['cpu_seconds']:.2f} s CPU): {cur['seconds'] / base['seconds']:.2f}x wall, "
          f"{cur['cpu_seconds'] / base['cpu_seconds']:.2f}x CPU")
    if not a.no_prior:
        bp, cp = base["prior_t2r"], cur["prior_t2r"]
        print(f"mean-box prior, held-out T2R: mean IoU {bp['mean_iou']:.3f} -> {cp['mean_iou']:.3f}, "
              f"region F1 {bp['region_f1']:.3f} -> {cp['region_f1']:.3f}, "
              f"Acc@0.5 {bp['acc@0.5']:.3f} -> {cp['acc@0.5']:.3f} ({bp['items']} / {cp['items']} items)")
        for m in sorted(cp["mean_iou_by_modality"]):
            print(f"  {m}: {bp['mean_iou_by_modality'].get(m, float('nan')):.3f} -> {cp['mean_iou_by_modality'][m]:.3f}")
    out = Path(a.out)
    io.write_json(out, results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
