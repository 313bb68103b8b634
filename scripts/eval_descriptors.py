"""Effect of the physical descriptors on recognition: real WSe2 defects, ground-truth boxes.

    python scripts/eval_descriptors.py [--weights 0 0.2 0.3 0.5] [--n-refs 5] [--seeds 5]
                                       [--encoder pixel|zernike]

Recognition only (no segmentation): every labelled box of ``../shared/data/labelled/wse2_defects``
(COCO, 8 classes = Large/Small x Bright/Dim x Peak/Trough, 725 boxes in 27 rendered images) is cut
as a square window centred on the box (side ``CROP_FACTOR`` x the longer box side, so the encoder
sees the shape at a normalised scale, as the UniMR GUI crops), resized to 64 px and normalised
(:func:`agent.normalise.to_grey`, per-crop contrast). Its descriptors come from
:func:`agent.descriptors.describe_objects` on the box (half-maximum mask; the pixel size is the
scan size in the file name / image width; heights in local-roughness units, the images are
rendered). Per seed, ``--n-refs`` random boxes per class are the references (all 72 poses), the
others the queries, assigned to the best species (no threshold: every box is a defect). Classes
with fewer than ``n_refs + 1`` boxes are left out (Large Dim Trough has one box).

Similarity: ``(1 - w) cos_e + w cos_d`` (:func:`agent.match.species_scores`), the descriptors
standardised with :func:`agent.descriptors.fit_reference_scaler` on the references, as in the
pipeline. Prints per-class P/R/F1 (pooled over seeds), macro F1 (mean +- sd over seeds) and the
Large-vs-Small accuracy of the assigned class for each weight.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]

from stm_agent.agent.config import NormaliseConfig  # noqa: E402
from stm_agent.agent.descriptors import describe_objects, fit_reference_scaler  # noqa: E402
from stm_agent.agent.match import RefEmbeddings, species_scores  # noqa: E402
from stm_agent.agent.normalise import crop_windows, make_poses, to_grey  # noqa: E402

#: Window side / longer box side.
CROP_FACTOR = 1.5


def load_wse2(folder: Path, size_px: int = 64) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Every box of the WSe2 set: ``(labels int (B,), class names, grey uint8 (B, S, S), desc (B, 4))``.

    ``desc`` is :meth:`agent.descriptors.Descriptors.matrix` (log area nm^2, log extent nm,
    |height| in sigma, contrast sign).

    Raises
    ------
    FileNotFoundError
        The data set is missing.
    """
    ann = json.loads((folder / "annotations.json").read_text())
    names = [c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"])]
    cid = {c["id"]: i for i, c in enumerate(sorted(ann["categories"], key=lambda c: c["id"]))}
    cfg = NormaliseConfig(size_px=size_px)
    labels, grey, desc = [], [], []
    for im in ann["images"]:
        boxes = [a for a in ann["annotations"] if a["image_id"] == im["id"]]
        if not boxes:
            continue
        g = cv2.imread(str(folder / im["file_name"]), cv2.IMREAD_GRAYSCALE)
        if g is None:
            raise FileNotFoundError(folder / im["file_name"])
        g = g.astype(np.float32) / 255.0
        px = float(re.search(r"_(\d+)[xX](\d+)_", im["file_name"]).group(1)) / im["width"]  # nm per pixel
        b = np.array([a["bbox"] for a in boxes], dtype=np.float64)
        desc.append(describe_objects(g, np.rint(b).astype(int), (px, px), z_unit=None).matrix())
        for x, y, w, h in b:
            side = CROP_FACTOR * max(w, h, 2.0)
            c = crop_windows(g, np.array([[x + w / 2 - 0.5, y + h / 2 - 0.5]]), side * px, (px, px), size_px)
            grey.append(to_grey(c, cfg)[0])
        labels += [cid[a["category_id"]] for a in boxes]
    return np.array(labels), names, np.stack(grey), np.concatenate(desc)


def evaluate(labels, names, grey, desc, encoder, weights, n_refs: int = 5, seeds: int = 5,
             cfg: NormaliseConfig | None = None) -> dict[float, dict]:
    """Recognition-only evaluation for each weight (module docstring).

    Returns
    -------
    dict
        ``{w: {"conf": int (K, K) confusion summed over seeds (rows = true, cols = predicted, over
        the kept classes), "classes": kept class names, "macro_f1": float (S,) per seed,
        "size_acc": float (S,) Large/Small accuracy per seed}}``.
    """
    cfg = cfg or NormaliseConfig()
    keep = [k for k in range(len(names)) if np.sum(labels == k) > n_refs]
    q_emb_all = encoder.embed(grey)
    out = {w: {"conf": np.zeros((len(keep), len(keep)), int), "classes": [names[k] for k in keep],
               "macro_f1": [], "size_acc": []} for w in weights}
    large = np.array([names[k].startswith("Large") for k in keep])
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        ref_i = np.concatenate([rng.choice(np.flatnonzero(labels == k), n_refs, replace=False) for k in keep])
        q_i = np.setdiff1d(np.flatnonzero(np.isin(labels, keep)), ref_i)
        ref_sp = np.array([keep.index(labels[i]) for i in ref_i])
        poses, angles, mirrored = make_poses(grey[ref_i], cfg)
        r, p, s, _ = poses.shape
        sc = fit_reference_scaler(desc[ref_i], ref_sp)
        refs = RefEmbeddings(
            emb=encoder.embed(poses.reshape(r * p, s, s)), species_idx=np.repeat(ref_sp, p),
            angle_deg=np.tile(angles, r), mirrored=np.tile(mirrored, r), species=[names[k] for k in keep],
            ref_idx=np.repeat(np.arange(r), p), desc_std=sc.transform(desc[ref_i]),
            desc_center=sc.center_, desc_scale=sc.scale_,
        )
        truth = np.array([keep.index(labels[i]) for i in q_i])
        qd = refs.standardise(desc[q_i])
        for w in weights:
            scores, _ = species_scores(q_emb_all[q_i], refs, qd, w)
            pred = np.argmax(scores, axis=1)
            conf = np.zeros((len(keep), len(keep)), int)
            np.add.at(conf, (truth, pred), 1)
            out[w]["conf"] += conf
            out[w]["macro_f1"].append(float(np.mean(_prf(conf)[2])))
            out[w]["size_acc"].append(float(np.mean(large[truth] == large[pred])))
    for w in weights:
        out[w]["macro_f1"] = np.array(out[w]["macro_f1"])
        out[w]["size_acc"] = np.array(out[w]["size_acc"])
    return out


def _prf(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (0 where undefined) of a confusion matrix (rows = true)."""
    tp = np.diag(conf).astype(float)
    p = np.divide(tp, conf.sum(0), out=np.zeros_like(tp), where=conf.sum(0) > 0)
    r = np.divide(tp, conf.sum(1), out=np.zeros_like(tp), where=conf.sum(1) > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2, 0.3, 0.5])
    ap.add_argument("--n-refs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--encoder", choices=["pixel", "zernike"], default="pixel")
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "labelled" / "wse2_defects")
    a = ap.parse_args()
    if a.encoder == "pixel":
        from stm_agent.models.pixel import PixelEncoder
        enc = PixelEncoder(64)
    else:
        from stm_agent.models.zernike import ZernikeEncoder
        enc = ZernikeEncoder(64)
    labels, names, grey, desc = load_wse2(a.data)
    res = evaluate(labels, names, grey, desc, enc, a.weights, a.n_refs, a.seeds)
    print(f"WSe2 defects, {len(labels)} boxes, encoder {enc.id}, {a.n_refs} refs/class, {a.seeds} seeds "
          f"(per-class figures pooled over seeds)")
    for w, r in res.items():
        p, rc, f = _prf(r["conf"])
        print(f"\nw = {w:.2f}   macro F1 {r['macro_f1'].mean():.3f} +- {r['macro_f1'].std():.3f}   "
              f"Large/Small accuracy {r['size_acc'].mean():.3f}")
        for c, pp, rr, ff, n in zip(r["classes"], p, rc, f, r["conf"].sum(1)):
            print(f"  {c:<22} P {pp:.2f}  R {rr:.2f}  F1 {ff:.2f}  (n {n})")


if __name__ == "__main__":
    main()
