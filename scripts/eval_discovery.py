"""Discovery measured against the labels of the shared sets with >= 2 real species: ARI, NMI, purity
per embedding x clustering, and the baselines (random labels; k-means on raw pixels).

    python scripts/eval_discovery.py --baselines          # stage 1: the baselines only
    python scripts/eval_discovery.py [--autoencoder]      # stage 2: every embedding x method
    python scripts/eval_discovery.py --json docs/results/discovery.json

Sets (../shared/data/labelled): ``fhpb`` (2 images, L 61 / R 48 boxes; the two images show one
scene), ``crops/FHPB`` (L 25 / R 21 single-molecule crops), ``wse2_defects`` (the 15 SL445 images
with ``pixel_size_nm``: physical sizes; 7 classes). Objects are the labelled boxes (the clustering
is measured, not the segmentation); ``sparse`` (one class) and Monoradical (``others`` is not a
species) are left out, as the issue says.

Baselines: ``random`` = uniformly random labels with the true number of classes (mean and 99th
percentile over 200 draws); ``kmeans-rawpixels`` = k-means (k = the true number of classes, an
advantage the methods do not get) on the crops as they are (no canonical pose), PCA 16.
The methods choose k themselves (silhouette over 2..8, then clusters one Gaussian explains merged,
agent.discovery.merge_gaussian; HDBSCAN density); the silhouette-alone k and ARI are kept beside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from stm_agent.adapters.labelled import load_coco, read_grey
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.discovery import EMBEDDINGS, METHODS, cluster, cluster_scores, embed, objects_from_boxes
from stm_agent.agent.flatten import flatten
from stm_agent.agent.normalise import to_grey

LAB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "labelled"


def load_sets(cfg: AgentConfig) -> dict:
    """{set name: Objects with labels}."""
    out = {}
    ims, _ = load_coco(LAB / "fhpb")
    items, labels = [], []
    for im in ims:
        g = flatten(read_grey(im.path), plane=True, rows="none")
        items.append((g, im.boxes, (1.0, 1.0), im.path.name))
        labels += im.labels
    out["fhpb"] = objects_from_boxes(items, cfg, labels)

    meta = json.loads((LAB / "wse2_defects" / "annotations.json").read_text())
    px = {i["file_name"]: i.get("pixel_size_nm") for i in meta["images"]}
    ims, _ = load_coco(LAB / "wse2_defects")
    items, labels = [], []
    for im in ims:
        p = px.get(im.path.name)
        if not p:
            continue
        g = flatten(read_grey(im.path), plane=True, rows="none")
        items.append((g, im.boxes, (float(p[0]), float(p[1])), im.path.name))
        labels += im.labels
    out["wse2_defects (15 with pixel size)"] = objects_from_boxes(items, cfg, labels)

    from stm_agent.agent.descriptors import describe_objects
    from stm_agent.agent.discovery import Objects, _desc_matrix

    import cv2

    s = cfg.normalise.size_px
    greys, descs, labels, names = [], [], [], []
    for cl in ("L", "R"):
        for f in sorted((LAB / "crops" / "FHPB" / cl).iterdir()):
            g = read_grey(f)
            greys.append(cv2.resize(g, (s, s), interpolation=cv2.INTER_AREA))
            h, w = g.shape
            d = describe_objects(g, np.array([[0, 0, w, h]]), (1.0, 1.0), z_unit=None)
            descs.append(_desc_matrix(d)[0])
            labels.append(cl)
            names.append(f.name)
    out["crops/FHPB"] = Objects(to_grey(np.stack(greys), cfg.normalise), np.array(descs), names,
                                np.zeros((len(names), 2)), np.zeros((len(names), 4), int), 0.0, labels=labels)
    return out


def baselines(objs, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    truth = np.array(objs.labels)
    k = len(set(objs.labels))
    rand = [cluster_scores(truth, rng.integers(0, k, len(truth)))["ari"] for _ in range(200)]
    x = embed(objs, "rawpixels")
    km = cluster_scores(truth, cluster(x, "kmeans", k=k).labels)
    return {"random_ari_mean": float(np.mean(rand)), "random_ari_p99": float(np.percentile(rand, 99)),
            "kmeans_rawpixels": km, "n": len(truth), "classes": k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", action="store_true", help="Only the baselines (stage 1).")
    ap.add_argument("--autoencoder", action="store_true", help="Also the torch autoencoder embedding.")
    ap.add_argument("--json", type=Path, help="Write every figure here.")
    a = ap.parse_args()
    cfg = AgentConfig()
    t0 = time.perf_counter()
    sets = load_sets(cfg)
    print(f"load {os.getloadavg()}; sets loaded in {time.perf_counter() - t0:.1f} s")
    res: dict = {}
    for name, objs in sets.items():
        b = baselines(objs)
        res[name] = {"baselines": b, "methods": {}}
        print(f"\n## {name}: {b['n']} objects, {b['classes']} classes")
        print(f"  random labels: ARI mean {b['random_ari_mean']:+.3f}, p99 {b['random_ari_p99']:+.3f}; "
              f"k-means on raw pixels (k true): ARI {b['kmeans_rawpixels']['ari']:+.3f} "
              f"NMI {b['kmeans_rawpixels']['nmi']:.3f} purity {b['kmeans_rawpixels']['purity']:.3f}")
    if a.baselines:
        return
    embs = list(EMBEDDINGS)
    ae = {}
    if a.autoencoder:
        from stm_agent.models.autoencoder import train_autoencoder

        embs += ["autoencoder", "autoencoder+descriptors"]
    for name, objs in sets.items():
        if a.autoencoder:
            ae[name] = train_autoencoder(objs.grey, seed=0)
        print(f"\n## {name}")
        print(f"  {'embedding':28s} {'method':14s} {'k':>3s} {'ARI':>7s} {'NMI':>6s} {'purity':>7s}   "
              "(silhouette alone: k, ARI)")
        for e in embs:
            x = embed(objs, e, autoencoder=ae.get(name))
            for m in METHODS:
                cl = cluster(x, m)
                sc = cluster_scores(objs.labels, cl.labels)
                row = {**sc, "silhouette": cl.silhouette}
                extra = ""
                if cl.k_silhouette is not None:  # k by silhouette, then merged (agent.discovery.merge_gaussian)
                    alone = cluster_scores(objs.labels, cluster(x, m, merge=False).labels)
                    row |= {"k_silhouette": cl.k_silhouette, "ari_silhouette_alone": alone["ari"]}
                    extra = f"   ({cl.k_silhouette}, {alone['ari']:+.3f})"
                res[name]["methods"][f"{e} / {m}"] = row
                print(f"  {e:28s} {m:14s} {sc['k']:3d} {sc['ari']:+7.3f} {sc['nmi']:6.3f} {sc['purity']:7.3f}{extra}")
    rank = {}
    for key in next(iter(res.values()))["methods"]:
        rank[key] = float(np.mean([res[s]["methods"][key]["ari"] for s in res]))
    best = sorted(rank.items(), key=lambda kv: -kv[1])
    print("\nmean ARI over the sets, best first:")
    for k, v in best[:8]:
        print(f"  {k:45s} {v:+.3f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"sets": res, "mean_ari": rank}, indent=1))
    print(f"load {os.getloadavg()}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
