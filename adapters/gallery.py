"""Files of a discovery run: one PNG per cluster, a contact sheet, the object and cluster tables,
and ``discovery.json`` (what ``stm-agent refs add --from-cluster`` reads).

Layout under the output folder::

    contact_sheet.png       one row per cluster: its label, size, and its medoids (most typical first)
    cluster_<c>.png         every object of cluster c (up to 96), medoids first, then by distance
    medoid_<c>_<j>.png      the j-th medoid's crop (8-bit grey, ``normalise.size_px`` square)
    clusters.csv            cluster, n, mean area (nm^2), extent (nm), height, share of depressions
    objects.csv             one row per object: scan, x_px, y_px, area, extent, height, contrast, cluster
    discovery.json          method, parameters, and per cluster its medoids (scan path + pixel position)
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["write_discovery", "read_discovery", "DISCOVERY_JSON"]

DISCOVERY_JSON = "discovery.json"
TILE = 80
_PALETTE = [(0, 159, 230), (233, 180, 86), (115, 158, 0), (66, 228, 240), (178, 114, 0), (0, 94, 213),
            (167, 121, 204), (255, 255, 255)]


def _tile(grey: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    t = cv2.resize(grey, (TILE - 4, TILE - 4), interpolation=cv2.INTER_NEAREST if grey.shape[0] < TILE else cv2.INTER_AREA)
    t = cv2.cvtColor(t, cv2.COLOR_GRAY2BGR)
    return cv2.copyMakeBorder(t, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=colour)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.5, colour=(235, 235, 235)) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _order(x: np.ndarray, idx: np.ndarray, med: list[int]) -> list[int]:
    d = np.linalg.norm(x[idx] - x[idx].mean(axis=0), axis=1)
    rest = [int(i) for i in idx[np.argsort(d)] if int(i) not in med]
    return list(med) + rest


def _summary(objs, idx: np.ndarray) -> dict[str, float]:
    d = objs.desc[idx]
    return {"area_nm2": float(np.median(d[:, 0])), "extent_nm": float(np.median(d[:, 1])),
            "height": float(np.median(d[:, 2])), "depressions": float(np.mean(d[:, 3] < 0))}


def write_discovery(out: str | Path, objs, x: np.ndarray, clustering, meds: dict[int, list[int]],
                    info: dict[str, Any], height_unit: str = "") -> list[Path]:
    """Write the gallery, the tables and ``discovery.json`` into ``out``.

    Parameters
    ----------
    out : str | Path
        Output folder (created).
    objs : agent.discovery.Objects
    x : np.ndarray
        float ``(N, d)`` the embedding that was clustered (orders the tiles).
    clustering : agent.discovery.Clustering
    meds : dict[int, list[int]]
        Medoid object indices per cluster (:func:`agent.discovery.medoids`).
    info : dict
        Embedding, method and anything else to record in ``discovery.json``.
    height_unit : str
        Unit of the apparent height, for the tables.

    Returns
    -------
    list[Path]
        The files written.

    Raises
    ------
    OSError
        ``out`` cannot be written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lab = clustering.labels
    clusters = sorted(set(lab.tolist()))
    files: list[Path] = []
    rows_json = []
    sheet_rows = []
    per_row = 10
    for c in clusters:
        idx = np.flatnonzero(lab == c)
        med = meds.get(int(c), [])
        order = _order(x, idx, med)
        colour = (150, 150, 150) if c < 0 else _PALETTE[c % len(_PALETTE)]
        summ = _summary(objs, idx)
        name = "noise" if c < 0 else f"cluster {c}"
        title = (f"{name}: {len(idx)} objects, area {summ['area_nm2']:.3g} nm2, extent {summ['extent_nm']:.3g} nm, "
                 f"height {summ['height']:.3g} {height_unit}, {summ['depressions']:.0%} depressions")
        # one PNG per cluster
        shown = order[:96]
        cols = min(12, len(shown))
        rows = math.ceil(len(shown) / cols)
        img = np.full((40 + rows * TILE, max(cols * TILE, 760), 3), 30, np.uint8)
        _text(img, title + ("" if len(order) <= 96 else f" (first 96 of {len(order)})"), (8, 26))
        for k, i in enumerate(shown):
            r, q = divmod(k, cols)
            t = _tile(objs.grey[i], colour if k < len(med) else (70, 70, 70))
            img[40 + r * TILE:40 + (r + 1) * TILE, q * TILE:(q + 1) * TILE] = t
        p = out / f"cluster_{'noise' if c < 0 else c}.png"
        if not cv2.imwrite(str(p), img):
            raise OSError(f"{p}: could not write the PNG")
        files.append(p)
        # contact sheet row
        row = np.full((TILE + 24, 190 + per_row * TILE, 3), 30, np.uint8)
        cv2.rectangle(row, (4, 4), (184, TILE + 18), colour, 2)
        _text(row, name, (12, 30), 0.6)
        _text(row, f"n = {len(idx)}", (12, 55))
        _text(row, f"{summ['area_nm2']:.3g} nm2", (12, 78))
        for k, i in enumerate(order[:per_row]):
            row[12:12 + TILE, 190 + k * TILE:190 + (k + 1) * TILE] = _tile(objs.grey[i], colour if k < len(med) else (70, 70, 70))
        sheet_rows.append(row)
        pngs = []
        for j, i in enumerate(med if c >= 0 else []):  # each medoid's crop, for the dashboard's gallery
            p = out / f"medoid_{c}_{j}.png"
            if not cv2.imwrite(str(p), objs.grey[i]):
                raise OSError(f"{p}: could not write the PNG")
            files.append(p)
            pngs.append(p.name)
        rows_json.append({
            "cluster": int(c), "n": int(len(idx)), **summ, "png": f"cluster_{'noise' if c < 0 else c}.png",
            "medoids": [{"scan": objs.frame[i], "x_px": float(objs.centroid_px[i, 0]), "y_px": float(objs.centroid_px[i, 1]),
                         "bbox_px": [int(v) for v in objs.bbox_px[i]], "png": png} for i, png in zip(med, pngs)],
        })
    header = np.full((36, sheet_rows[0].shape[1], 3), 30, np.uint8)
    _text(header, f"{len(objs)} objects from {len(set(objs.frame))} frames; {info.get('embedding')} / "
                  f"{info.get('method')}, k = {clustering.k}; framed tiles = medoids", (8, 24))
    sheet = np.concatenate([header, *sheet_rows], axis=0)
    p = out / "contact_sheet.png"
    if not cv2.imwrite(str(p), sheet):
        raise OSError(f"{p}: could not write the PNG")
    files.insert(0, p)
    p = out / "clusters.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cluster", "n", "area_nm2", "extent_nm", f"height_{height_unit}", "depressions", "medoid_scan",
                    "medoid_x_px", "medoid_y_px"])
        for r in rows_json:
            m = r["medoids"][0] if r["medoids"] else {"scan": "", "x_px": "", "y_px": ""}
            w.writerow([r["cluster"], r["n"], f"{r['area_nm2']:.4g}", f"{r['extent_nm']:.4g}", f"{r['height']:.4g}",
                        f"{r['depressions']:.3f}", m["scan"], m["x_px"], m["y_px"]])
    files.append(p)
    p = out / "objects.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scan", "x_px", "y_px", "area_nm2", "extent_nm", f"height_{height_unit}", "contrast", "cluster"])
        for i in range(len(objs)):
            w.writerow([objs.frame[i], f"{objs.centroid_px[i, 0]:.2f}", f"{objs.centroid_px[i, 1]:.2f}",
                        f"{objs.desc[i, 0]:.4g}", f"{objs.desc[i, 1]:.4g}", f"{objs.desc[i, 2]:.4g}",
                        int(objs.desc[i, 3]), int(lab[i])])
    files.append(p)
    p = out / DISCOVERY_JSON
    p.write_text(json.dumps({**info, "k": clustering.k, "k_silhouette": getattr(clustering, "k_silhouette", None),
                             "silhouette": clustering.silhouette,
                             "silhouette_per_k": {str(k): v for k, v in clustering.tried.items()},
                             "window_nm": objs.window_nm, "n_objects": len(objs), "scans": sorted(set(objs.frame)),
                             "height_unit": height_unit, "clusters": rows_json}, indent=1, default=float))
    files.append(p)
    return files


def read_discovery(folder: str | Path) -> dict[str, Any]:
    """``discovery.json`` of a discovery folder.

    Raises
    ------
    ReferenceLibraryError
        No readable ``discovery.json`` in ``folder``.
    """
    from stm_agent.agent.errors import ReferenceLibraryError

    p = Path(folder) / DISCOVERY_JSON
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReferenceLibraryError(f"{p}: no discovery results here (run `stm-agent discover SCANS --out "
                                    f"{folder}` first): {getattr(exc, 'strerror', None) or exc}") from None
