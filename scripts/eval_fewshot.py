"""Few-shot lattice defects on the shared wse2_defects set: recognition-only and end-to-end macro-F1
at K = 1 and K = 5 (5 draws), with and without the COCO ``pixel_size_nm``.

    python scripts/eval_fewshot.py [--draws 5] [--json docs/results/fewshot.json]

Pipeline (agent/lattice.py, agent/fewshot.py): flatten (plane) -> FFT Bragg-peak removal ->
defects of both polarities at the examples' scale (difference of Gaussians, 3 robust sigma) ->
SimpleShot (pixels in robust sigma + radial profile + descriptors; centred, L2-normalised; class
mean of K examples). The K examples per class are drawn from the labelled boxes (seeded); they are
never scored. Recognition-only: every other labelled box is classified. End-to-end: detections
are matched to the labelled boxes (``adapters.labelled.match_boxes``: IoU >= 0.5 or centroid in
the box); unmatched detections are false positives of their predicted class, unmatched boxes are
misses. A class with fewer than K + 1 boxes is excluded from that K (its boxes are neither
examples nor scored, and detections matched to them are ignored). P/R/F1 from
``agent.evaluation.confusion_matrix`` / ``metrics``.

Variants: ``nm`` = the 15 SL445 images that carry ``pixel_size_nm`` (sizes and windows in nm);
``px (same 15)`` = those images with sizes in pixels; ``px (all 27)`` = every image in pixels (the
other 12 carry no pixel size).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from stm_agent.adapters.labelled import load_coco, match_boxes, read_grey
from stm_agent.agent.descriptors import region_masks
from stm_agent.agent.evaluation import confusion_matrix, metrics
from stm_agent.agent.fewshot import DefectFeatures, SimpleShot, defect_features
from stm_agent.agent.flatten import flatten
from stm_agent.agent.lattice import find_defects, remove_lattice

LAB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "labelled" / "wse2_defects"
WINDOW_FACTOR = 2.0


def load(variant: str):
    meta = json.loads((LAB / "annotations.json").read_text())
    px = {i["file_name"]: i.get("pixel_size_nm") for i in meta["images"]}
    ims, classes = load_coco(LAB)
    out = []
    for im in ims:
        p = px.get(im.path.name)
        if variant != "px (all 27)" and not p:
            continue
        ps = (float(p[0]), float(p[1])) if (variant == "nm") else (1.0, 1.0)
        g = flatten(read_grey(im.path), plane=True, rows="none")
        resid, info = remove_lattice(g)
        out.append({"name": im.path.name, "image": g, "resid": resid, "lattice": info, "ps": ps,
                    "boxes": im.boxes, "labels": im.labels})
    return out, classes


def run(images, classes, k: int, seed: int, cache: dict, use_reject: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    objs = [(i, j) for i, im in enumerate(images) for j in range(len(im["labels"]))]
    lab = np.array([images[i]["labels"][j] for i, j in objs])
    eligible = [c for c in classes if (lab == c).sum() >= k + 1]
    support = []
    for c in eligible:
        support += [objs[t] for t in rng.choice(np.flatnonzero(lab == c), size=k, replace=False)]
    sup = set(support)
    # the examples' size fixes the scale (defect size) and the window
    size_nm = float(np.median([np.mean(images[i]["boxes"][j][2:]) * images[i]["ps"][0] for i, j in support]))
    win_nm = WINDOW_FACTOR * size_nm

    def feats(i, boxes, masks=None):
        im = images[i]
        return defect_features(im["resid"], boxes, im["ps"], win_nm / im["ps"][0], masks)

    # recognition-only
    per_img = [feats(i, im["boxes"]) for i, im in enumerate(images)]
    allf = DefectFeatures.concat(per_img)
    row = {o: n for n, o in enumerate(objs)}
    s_idx = [row[o] for o in support]
    clf = SimpleShot(allf).fit(allf.take(s_idx), [lab[t] for t in s_idx])
    q_idx = [n for n, o in enumerate(objs) if o not in sup and lab[n] in eligible]
    pred = clf.predict(allf.take(q_idx))
    ci = {c: n for n, c in enumerate(eligible)}
    conf = confusion_matrix(np.array([ci[lab[t]] for t in q_idx]), np.array([ci[p] for p in pred]), len(eligible))
    rec = metrics(conf, eligible)
    # end-to-end
    det_f, det_meta = [], []
    for i, im in enumerate(images):
        key = (i, round(size_nm, 4))
        if key not in cache:
            cache[key] = find_defects(im["resid"], im["ps"], size_nm / im["ps"][0])
        regs = [r for r in cache[key] if not r.touches_edge]
        if not regs:
            continue
        boxes = np.array([r.bbox_px for r in regs], np.float64)
        cents = np.array([r.centroid_px for r in regs], np.float64)
        det_f.append(feats(i, boxes, region_masks(regs)))
        m = match_boxes(boxes, cents, im["boxes"])
        det_meta += [(i, int(g)) for g in m]
    df = DefectFeatures.concat(det_f)
    clf2 = SimpleShot(DefectFeatures.concat([df, allf.take(s_idx)])).fit(allf.take(s_idx), [lab[t] for t in s_idx])
    dpred = clf2.predict(df)
    reject = clf2.rejection_threshold(allf.take(s_idx), [lab[t] for t in s_idx]) if use_reject else None
    if reject is not None and len(df):
        best = clf2.scores(df).max(axis=1)
        dpred = [p if b >= reject else None for p, b in zip(dpred, best)]
    t_true, t_pred = [], []
    matched = set()
    for (i, g), p in zip(det_meta, dpred):
        if g >= 0:
            matched.add((i, g))
            if (i, g) in sup:
                continue
            c = images[i]["labels"][g]
            if c not in eligible:
                continue  # an excluded class: not scored
            t_true.append(ci[c])
        else:
            t_true.append(-1)
        t_pred.append(ci[p] if p is not None else len(eligible))  # None: rejected (other)
    for n, o in enumerate(objs):
        if o not in sup and o not in matched and lab[n] in eligible:
            t_true.append(ci[lab[n]])
            t_pred.append(len(eligible) + 1)  # missed
    conf2 = confusion_matrix(np.array(t_true), np.array(t_pred), len(eligible))
    e2e = metrics(conf2, eligible)
    n_det = len(det_meta)
    return {"k": k, "seed": seed, "eligible": eligible, "excluded": [c for c in classes if c not in eligible],
            "size_nm": size_nm, "rec_macro_f1": rec["macro"]["f1"], "e2e_macro_f1": e2e["macro"]["f1"],
            "e2e_micro_f1": e2e["micro"]["f1"], "detections": n_det,
            "det_recall": float(np.mean([o in matched for o in objs])),
            "rec_per_class": {c: v["f1"] for c, v in rec["per_class"].items()},
            "e2e_per_class": {c: v["f1"] for c, v in e2e["per_class"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["nm", "px (same 15)", "px (all 27)"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reject", action="store_true", help="End-to-end: detections below the examples' "
                    "leave-one-out similarity are 'other' (K >= 2).")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5])
    a = ap.parse_args()
    t0 = time.perf_counter()
    out = {}
    for v in a.variants:
        images, classes = load(v)
        nl = sum(im["lattice"].found for im in images)
        print(f"\n## {v}: {len(images)} images, {sum(len(im['labels']) for im in images)} boxes; "
              f"lattice peaks found in {nl}")
        cache: dict = {}
        for k in a.ks:
            rs = [run(images, classes, k, s, cache, a.reject) for s in range(a.draws)]
            f = lambda key: (float(np.mean([r[key] for r in rs])), float(np.std([r[key] for r in rs])))  # noqa: E731
            out[f"{v} K={k}"] = {"draws": rs, "rec_macro_f1": f("rec_macro_f1"), "e2e_macro_f1": f("e2e_macro_f1"),
                                 "e2e_micro_f1": f("e2e_micro_f1"), "det_recall": f("det_recall"),
                                 "excluded": rs[0]["excluded"]}
            print(f"  K={k}: recognition macro-F1 {f('rec_macro_f1')[0]:.3f} +- {f('rec_macro_f1')[1]:.3f}; "
                  f"end-to-end macro-F1 {f('e2e_macro_f1')[0]:.3f} +- {f('e2e_macro_f1')[1]:.3f} "
                  f"(micro {f('e2e_micro_f1')[0]:.3f}; detection recall {f('det_recall')[0]:.2f}, "
                  f"{np.mean([r['detections'] for r in rs]):.0f} detections); excluded: {rs[0]['excluded']}")
            pc = {c: np.mean([r["rec_per_class"][c] for r in rs]) for c in rs[0]["eligible"]}
            print("    rec F1 per class: " + ", ".join(f"{c} {x:.2f}" for c, x in pc.items()))
    print(f"\nload {os.getloadavg()}; {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
