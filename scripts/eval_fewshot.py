"""Few-shot lattice defects on the shared wse2_defects set: recognition-only and end-to-end macro-F1
at K = 1 and K = 5 (5 draws), with and without the COCO ``pixel_size_nm``.

    python scripts/eval_fewshot.py [--draws 5] [--json docs/results/fewshot.json]

The agent's lattice route (agent/lattice.py, agent/fewshot.py): flatten (plane) -> FFT Bragg-peak
removal -> defects = scale-space blobs of both polarities (scale-normalised LoG extrema, in local
noise units, Lowe's edge test) with extents within ``match.size_tolerance`` (1.5) of the examples'
sizes, at the false-alarm threshold of about one noise blob per frame -> SimpleShot per frame
(pixels in robust sigma + radial profile + descriptors; centred, L2-normalised; class mean of the K
examples) with the physical rules (polarity of the examples, size within 1.5x) -> nearest
prototype. The K examples per class are drawn from the labelled boxes (seeded) and become the
agent's references (crops of the lattice-free frame, as ``refs add`` cuts them); they are never
scored. Their polarity is measured (sign of the strongest scale-space extremum at 0.5-2x the box),
never read from the class name.

Recognition-only: every other labelled box is classified (one SimpleShot session over the set,
the same rules). End-to-end: each detection's box is its predicted class's median example size (the
labellers' box convention, learnt from the K examples only), matched to the labelled boxes at
IoU >= 0.5 (``adapters.labelled.match_boxes``, as ``agent.evaluation`` does); the lenient "IoU or
centroid in the box" figure is printed beside it (the measure of the first version of this script).
Unmatched detections are false positives of their predicted class; unmatched boxes are misses.
A class with fewer than K + 1 boxes is excluded from that K (its boxes are neither examples nor
scored, and detections matched to them are ignored). P/R/F1 from
``agent.evaluation.confusion_matrix`` / ``metrics``.

Variants: ``nm`` = the 15 SL445 images that carry ``pixel_size_nm`` (sizes and windows in nm);
``px (same 15)`` = those images with sizes in pixels; ``px (all 27)`` = every image in pixels (the
other 12 carry no pixel size). Environment switches (for the comparisons in docs/lattice.md):
FEWSHOT_AGENT=0 (one SimpleShot session over the set, argmax + rules), FEWSHOT_THRESHOLD=a cosine
(``match.threshold`` fixed), FEWSHOT_BOX=sigma (box = blob sigma x the class's box/sigma),
FEWSHOT_EXAMPLE_THRESHOLD=1 (detection threshold lowered to each species' weakest example, for
blobs of its polarity and sizes), FEWSHOT_HEAD=lda|logreg|protonet (recognition-only: a head
trained on the K examples in place of the SimpleShot prototypes; protonet needs torch).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from stm_agent.adapters.labelled import load_coco, match_boxes, read_grey
from stm_agent.agent.evaluation import confusion_matrix, metrics
from stm_agent.agent.domain import OTHER
from stm_agent.agent.fewshot import (REFERENCE_CROP_FACTOR, DefectFeatures, DefectReference, SimpleShot, classify_defects,
                                     defect_features, physical_rules, robust_stats)
from stm_agent.agent.flatten import fill_nan
from stm_agent.agent.flatten import flatten
from stm_agent.agent.lattice import (blob_sigma_at, false_alarm_threshold, find_blobs, inner_scales, remove_lattice,
                                     scale_grid)

LAB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "labelled" / "wse2_defects"
WINDOW_FACTOR = 2.0
#: the agent's physical rules (polarity, size within match.size_tolerance of a species' examples)
RULES = True
#: box of a detection: "class" = its predicted class's median example size; "sigma" = its blob's
#: sigma x that class's box / sigma
BOX = os.environ.get("FEWSHOT_BOX", "class")
#: end-to-end classification: the agent's (per frame, references cut from the frames, conformal
#: background threshold) or one SimpleShot session over the whole set (argmax + rules)
AGENT = os.environ.get("FEWSHOT_AGENT", "1") == "1"
#: detection threshold lowered to the weakest example of a species, for that species' polarity and sizes
EXAMPLE_THRESHOLD = os.environ.get("FEWSHOT_EXAMPLE_THRESHOLD", "0") == "1"
THRESHOLD = os.environ.get("FEWSHOT_THRESHOLD", "auto")
THRESHOLD = THRESHOLD if THRESHOLD == "auto" else float(THRESHOLD)
SIZE_TOLERANCE = 1.5
#: recognition-only head: "simpleshot" (the agent's) or one trained on the examples
HEAD = os.environ.get("FEWSHOT_HEAD", "simpleshot")


class TrainedHead(SimpleShot):
    """SimpleShot's features with a head trained on the K examples per class (the measurement of
    issue 12's "prototypical-network head if it helps"; not used by the agent).

    ``lda``: shrinkage linear discriminant analysis (Ledoit-Wolf); ``logreg``: logistic regression;
    ``protonet``: a prototypical network (Snell et al., NeurIPS 2017): a 64-32 MLP on the features,
    trained episodically (3 support / 2 query per class at K = 5, input noise 0.05, 300 episodes),
    class prototypes = mean embedding of the K examples, scores = softmax of -squared distance.
    """

    def fit(self, f, labels):
        super().fit(f, labels)
        x, lab = self.transform(f), np.asarray(labels)
        if HEAD == "lda":
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
            self.head = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, lab)
        elif HEAD == "logreg":
            from sklearn.linear_model import LogisticRegression
            self.head = LogisticRegression(max_iter=2000).fit(x, lab)
        elif HEAD == "protonet":
            import torch
            torch.manual_seed(0)
            rng = np.random.default_rng(0)
            xt = torch.tensor(x, dtype=torch.float32)
            net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                      torch.nn.Linear(64, 32))
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-3)
            idx = [np.flatnonzero(lab == c) for c in self.classes]
            for _ in range(300):
                sup, qry, qy = [], [], []
                for k, ii in enumerate(idx):
                    p = rng.permutation(ii)
                    ns = max(1, len(p) - 2)
                    sup.append(p[:ns])
                    qry += list(p[ns:])
                    qy += [k] * (len(p) - ns)
                if not qry:  # K = 1: nothing to train on
                    break
                e = net(xt + 0.05 * torch.randn_like(xt))
                protos = torch.stack([e[torch.as_tensor(s_)].mean(0) for s_ in sup])
                loss = torch.nn.functional.cross_entropy(-torch.cdist(e[torch.as_tensor(qry)], protos) ** 2,
                                                         torch.as_tensor(qy))
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                e = net(xt)
                self.protos = torch.stack([e[torch.as_tensor(ii)].mean(0) for ii in idx])
            self.net, self.head = net, "protonet"
        else:
            raise SystemExit(f"FEWSHOT_HEAD={HEAD!r}: choose simpleshot, lda, logreg or protonet")
        return self

    def scores(self, f):
        if self.head == "protonet":
            import torch
            with torch.no_grad():
                d = torch.cdist(self.net(torch.tensor(self.transform(f), dtype=torch.float32)), self.protos) ** 2
                return torch.softmax(-d, dim=1).numpy()
        p = self.head.predict_proba(self.transform(f))
        return p[:, [list(self.head.classes_).index(c) for c in self.classes]]


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
        g = flatten(read_grey(im.path), plane=True, rows=os.environ.get("FEWSHOT_ROWS", "median"))
        resid, info = remove_lattice(g)
        out.append({"name": im.path.name, "image": g, "resid": resid, "lattice": info, "ps": ps,
                    "boxes": im.boxes, "labels": im.labels})
    return out, classes


def _reference(im: dict, j: int, species: str) -> DefectReference:
    """A labelled example as the agent's reference: a crop of the lattice-free frame around its box
    (``refs add`` on the lattice route), the frame's robust statistics, its measured polarity."""
    x, y, w, h = (float(v) for v in im["boxes"][j])
    side = int(round(REFERENCE_CROP_FACTOR * max(w, h)))
    f, _ = fill_nan(np.asarray(im["resid"], np.float32))
    crop = cv2.getRectSubPix(f, (side, side), (x + w / 2, y + h / 2))
    return DefectReference(species, crop, im["ps"], (w, h), robust_stats(im["resid"]), int(im["sign"][j]))


def _boxes_of(regs) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([r.bbox_px for r in regs], np.float64).reshape(-1, 4),
            np.array([r.centroid_px for r in regs], np.float64).reshape(-1, 2))


def run(images, classes, k: int, seed: int, cache: dict, use_reject: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    objs = [(i, j) for i, im in enumerate(images) for j in range(len(im["labels"]))]
    lab = np.array([images[i]["labels"][j] for i, j in objs])
    eligible = [c for c in classes if (lab == c).sum() >= k + 1]
    support = []
    for c in eligible:
        support += [objs[t] for t in rng.choice(np.flatnonzero(lab == c), size=k, replace=False)]
    sup = set(support)
    # the examples fix the scale (defect sizes), the window and the box convention
    ex_size = {o: float(np.mean(images[o[0]]["boxes"][o[1]][2:]) * images[o[0]]["ps"][0]) for o in support}
    size_nm = float(np.median(list(ex_size.values())))
    win_nm = WINDOW_FACTOR * size_nm
    lo, hi = min(ex_size.values()) / SIZE_TOLERANCE, max(ex_size.values()) * SIZE_TOLERANCE  # as the agent
    kfac = {}
    for i in sorted({o[0] for o in support}):
        mine = [o for o in support if o[0] == i]
        b = np.array([images[i]["boxes"][j] for _, j in mine], np.float64)
        sig, _ = blob_sigma_at(images[i]["resid"], b[:, :2] + b[:, 2:] / 2, (lo / images[i]["ps"][0], hi / images[i]["ps"][0]))
        for o, side, sg in zip(mine, b[:, 2:].mean(axis=1), sig):
            kfac[o] = side / sg
    k_all = float(np.median(list(kfac.values())))
    # polarity of every labelled box, measured (the sign of its scale-space extremum), not read from its class name
    for i, im in enumerate(images):
        if "sign" not in im:
            b = np.asarray(im["boxes"], np.float64).reshape(-1, 4)
            side = b[:, 2:].mean(axis=1)  # the strongest extremum at 0.5-2x the box's size (a bright core beats its dark halo)
            im["sign"] = blob_sigma_at(im["resid"], b[:, :2] + b[:, 2:] / 2, np.column_stack([0.5 * side, 2.0 * side]))[1]
    ex_lab = [images[i]["labels"][j] for i, j in support]
    # how faint the examples are: a species whose examples stand less out than the false-alarm
    # threshold lowers it, for blobs of its polarity and size only
    ex_z = []
    for (i, j) in support:
        b = np.asarray(images[i]["boxes"][j], np.float64)
        side = b[2:].mean()
        ex_z.append(float(blob_sigma_at(images[i]["resid"], (b[:2] + b[2:] / 2)[None], (0.5 * side, 2.0 * side), return_z=True)[2][0]))
    weak_rules = []
    for c in eligible:
        idx = [n for n, o in enumerate(support) if images[o[0]]["labels"][o[1]] == c]
        sg = {int(images[support[n][0]]["sign"][support[n][1]]) for n in idx}
        szs = [ex_size[support[n]] for n in idx]
        for s_ in sg:
            weak_rules.append((max(3.0, min(ex_z[n] for n in idx)), s_, min(szs) / SIZE_TOLERANCE, max(szs) * SIZE_TOLERANCE))
    ex_sizes = [ex_size[o] for o in support]
    ex_sign = [int(images[i]["sign"][j]) for i, j in support]

    def decide(clf_, f, sizes, signs):
        if not len(f):
            return []
        sc = physical_rules(clf_.scores(f), clf_.classes, sizes, signs, ex_lab, ex_sizes, ex_sign,
                            SIZE_TOLERANCE if RULES else None) if RULES else clf_.scores(f)
        return [clf_.classes[t] for t in sc.argmax(axis=1)]
    cls_size = {c: float(np.median([ex_size[o] for o in support if images[o[0]]["labels"][o[1]] == c])) for c in eligible}
    k_cls = {c: float(np.median([kfac[o] for o in support if images[o[0]]["labels"][o[1]] == c])) for c in eligible}

    def feats(i, boxes):
        im = images[i]
        return defect_features(im["resid"], boxes, im["ps"], win_nm / im["ps"][0])

    # recognition-only
    per_img = [feats(i, im["boxes"]) for i, im in enumerate(images)]
    allf = DefectFeatures.concat(per_img)
    row = {o: n for n, o in enumerate(objs)}
    s_idx = [row[o] for o in support]
    clf = (SimpleShot if HEAD == "simpleshot" else TrainedHead)(allf).fit(allf.take(s_idx), [lab[t] for t in s_idx])
    q_idx = [n for n, o in enumerate(objs) if o not in sup and lab[n] in eligible]
    q_size = np.array([np.mean(images[objs[t][0]]["boxes"][objs[t][1]][2:]) * images[objs[t][0]]["ps"][0] for t in q_idx])
    q_sign = np.array([images[objs[t][0]]["sign"][objs[t][1]] for t in q_idx])
    pred = decide(clf, allf.take(q_idx), q_size, q_sign)
    ci = {c: n for n, c in enumerate(eligible)}
    conf = confusion_matrix(np.array([ci[lab[t]] for t in q_idx]), np.array([ci[p] for p in pred]), len(eligible))
    rec = metrics(conf, eligible)
    # end-to-end: scale-space blobs within the examples' size range, boxes in the examples' convention
    det_f, det_regs = [], []
    for i, im in enumerate(images):
        key = (i, round(lo, 4), round(hi, 4), round(k_all, 3))
        if key not in cache:
            rng_px = (lo / im["ps"][0], hi / im["ps"][0])
            if EXAMPLE_THRESHOLD:  # candidates down to the weakest example, kept by the rule below
                cache[key] = find_blobs(im["resid"], im["ps"], rng_px, threshold=max(3.0, min(ex_z)),
                                        extent_per_sigma=k_all, return_z=True)
            else:
                cache[key] = (find_blobs(im["resid"], im["ps"], rng_px, threshold=None, extent_per_sigma=k_all), None)
        regs_all, z_all = cache[key]
        if EXAMPLE_THRESHOLD:
            fa = false_alarm_threshold(im["resid"].shape, (lambda g: g[inner_scales(g, rng_px, k_all)])(
                scale_grid(rng_px, im["resid"].shape, extent_per_sigma=k_all)), int(np.isfinite(im["resid"]).sum()))
            keep = []
            for g, zv in zip(regs_all, z_all):
                ok = zv >= fa or any(zv >= t and g.contrast == sg and lo_s <= g.bbox_px[2] * im["ps"][0] <= hi_s
                                     for t, sg, lo_s, hi_s in weak_rules)
                keep.append(ok)
            regs_all = [g for g, k_ in zip(regs_all, keep) if k_]
        regs = [r for r in regs_all if not r.touches_edge]
        if regs:
            det_f.append(feats(i, _boxes_of(regs)[0]))
            det_regs.append((i, regs))
    if AGENT:  # the agent's classification (agent.fewshot.classify_defects), frame by frame
        refs = [_reference(images[i], j, lab_) for (i, j), lab_ in zip(support, ex_lab)]
        dpred = []
        for i, regs in det_regs:
            b, _ = _boxes_of(regs)
            r = classify_defects(images[i]["resid"], b, np.array([g.contrast for g in regs]), images[i]["ps"], refs,
                                 THRESHOLD, 0.05, SIZE_TOLERANCE)
            dpred += [None if nm_ == OTHER else nm_ for nm_ in r["names"]]
    else:  # one SimpleShot session over every detection of the set
        df = DefectFeatures.concat(det_f)
        clf2 = SimpleShot(DefectFeatures.concat([df, allf.take(s_idx)])).fit(allf.take(s_idx), [lab[t] for t in s_idx])
        d_size = np.concatenate([_boxes_of(r)[0][:, 2:].mean(axis=1) * images[i]["ps"][0] for i, r in det_regs]) if det_regs else np.zeros(0)
        d_sign = np.concatenate([[g.contrast for g in r] for _, r in det_regs]) if det_regs else np.zeros(0)
        dpred = decide(clf2, df, d_size, d_sign)
        reject = clf2.rejection_threshold(allf.take(s_idx), [lab[t] for t in s_idx]) if use_reject else None
        if reject is not None and len(df):
            best = clf2.scores(df).max(axis=1)
            dpred = [p if b >= reject else None for p, b in zip(dpred, best)]
    out = {"k": k, "seed": seed, "eligible": eligible, "excluded": [c for c in classes if c not in eligible],
           "size_nm": size_nm, "size_range": [lo, hi], "box_per_sigma": k_all, "rec_macro_f1": rec["macro"]["f1"],
           "rec_per_class": {c: v["f1"] for c, v in rec["per_class"].items()}}
    for tag, centroid in (("", False), ("_centroid", True)):
        t_true, t_pred, matched, n = [], [], set(), 0
        for i, regs in det_regs:
            b, c = _boxes_of(regs)
            ps = dpred[n:n + len(regs)]
            n += len(regs)
            # each detection's box in its predicted class's convention (sigma x that class's box/sigma)
            if BOX == "class":  # the predicted class's examples' median size
                side = np.array([cls_size[p] / images[i]["ps"][0] if p else b_ for p, b_ in zip(ps, b[:, 2])], np.float64)
            else:  # the blob's sigma x the predicted class's box / sigma
                side = b[:, 2] / k_all * np.array([k_cls.get(p, k_all) if p else k_all for p in ps])
            b = np.column_stack([c - side[:, None] / 2, side, side])
            m = match_boxes(b, c, images[i]["boxes"], centroid_inside=centroid)
            for g, p in zip(m, ps):
                if g >= 0:
                    matched.add((i, int(g)))
                    if (i, int(g)) in sup:
                        continue
                    cl = images[i]["labels"][g]
                    if cl not in eligible:
                        continue  # an excluded class: not scored
                    t_true.append(ci[cl])
                else:
                    t_true.append(-1)
                t_pred.append(ci[p] if p is not None else len(eligible))  # None: rejected (other)
        for n_, o in enumerate(objs):
            if o not in sup and o not in matched and lab[n_] in eligible:
                t_true.append(ci[lab[n_]])
                t_pred.append(len(eligible) + 1)  # missed
        e2e = metrics(confusion_matrix(np.array(t_true), np.array(t_pred), len(eligible)), eligible)
        out.update({f"e2e_macro_f1{tag}": e2e["macro"]["f1"], f"e2e_micro_f1{tag}": e2e["micro"]["f1"],
                    f"det_recall{tag}": float(np.mean([o in matched for o in objs]))})
        if not tag:
            out["e2e_per_class"] = {c: v["f1"] for c, v in e2e["per_class"].items()}
    out["detections"] = len(dpred)
    return out


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
            keys = ("rec_macro_f1", "e2e_macro_f1", "e2e_micro_f1", "det_recall", "e2e_macro_f1_centroid",
                    "e2e_micro_f1_centroid", "det_recall_centroid")
            out[f"{v} K={k}"] = {"draws": rs, **{key: f(key) for key in keys}, "excluded": rs[0]["excluded"]}
            print(f"  K={k}: recognition macro-F1 {f('rec_macro_f1')[0]:.3f} +- {f('rec_macro_f1')[1]:.3f}; "
                  f"end-to-end (IoU >= 0.5) macro-F1 {f('e2e_macro_f1')[0]:.3f} +- {f('e2e_macro_f1')[1]:.3f} "
                  f"(micro {f('e2e_micro_f1')[0]:.3f}; detection recall {f('det_recall')[0]:.2f}, "
                  f"{np.mean([r['detections'] for r in rs]):.0f} detections); IoU or centroid-in-box: macro "
                  f"{f('e2e_macro_f1_centroid')[0]:.3f}, recall {f('det_recall_centroid')[0]:.2f}; "
                  f"excluded: {rs[0]['excluded']}")
            pc = {c: np.mean([r["rec_per_class"][c] for r in rs]) for c in rs[0]["eligible"]}
            print("    rec F1 per class: " + ", ".join(f"{c} {x:.2f}" for c, x in pc.items()))
    print(f"\nload {os.getloadavg()}; {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
