"""Result files next to a scan: the JSON result and an annotated PNG overlay.

The overlay shows the flattened frame (grey, 1-99 % percentile stretch), one box per detection
coloured by species (dashed grey for objects cut by the edge, which are not counted), a legend with
the counts, and a scale bar in nm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from stm_agent.adapters.files import FILE_MODE, Roots, write_new
from stm_agent.agent.domain import OTHER, FrameResult

# Colour-blind-safe palette (Okabe & Ito 2008), BGR for OpenCV; `other` is always grey.
_PALETTE = [(0, 159, 230), (233, 180, 86), (115, 158, 0), (66, 228, 240), (178, 114, 0),
            (0, 94, 213), (167, 121, 204), (255, 255, 255)]
_OTHER_BGR = (150, 150, 150)
_MIN_SIDE_PX = 768  # overlays are upscaled so that labels stay readable on small scans


def display_dir(store_path: str | Path) -> Path:
    """Folder of the dashboard's display images: ``display`` next to the SQLite store."""
    return Path(store_path).parent / "display"


def species_colours(species: list[str]) -> dict[str, tuple[int, int, int]]:
    """Stable BGR colour per species (``other`` grey), in the order given."""
    named = [s for s in species if s != OTHER]
    out = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(named)}
    out[OTHER] = _OTHER_BGR
    return out


def _grey(image: np.ndarray) -> np.ndarray:
    """float (ny, nx) with NaN -> uint8 grey, robust 1-99 % stretch; NaN (not acquired) -> 0 (hatched later)."""
    finite = np.isfinite(image)
    out = np.zeros(image.shape, np.uint8)
    if finite.any():
        lo, hi = np.percentile(image[finite], [1, 99])
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out[finite] = np.clip((image[finite] - lo) * scale, 0, 255).astype(np.uint8)
    return out


def _nice_length(target: float) -> float:
    """Largest 1/2/5 x 10^k not above ``target`` (> 0)."""
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**k <= target:
            return m * 10**k
    return 10**k


def render_overlay(result: FrameResult, image: np.ndarray, pixel_size_nm: tuple[float, float]) -> np.ndarray:
    """Draw the detections of ``result`` over ``image``.

    Parameters
    ----------
    result : FrameResult
        Detections (bbox in pixels of ``image``) and counts.
    image : np.ndarray
        float (ny, nx), the flattened frame (NaN = not acquired).
    pixel_size_nm : (dx, dy)
        Pixel size in nm, for the scale bar and to display non-square pixels with the right aspect.

    Returns
    -------
    np.ndarray
        uint8 BGR (H, W, 3) image with a legend strip on the right.
    """
    ny, nx = image.shape
    dx, dy = pixel_size_nm
    # Display with square physical pixels, at least _MIN_SIDE_PX on the long side.
    w_nm, h_nm = nx * dx, ny * dy
    scale = max(_MIN_SIDE_PX / max(nx, ny * dy / dx), 1.0)
    sx = scale
    sy = scale * (dy / dx)
    W, H = max(int(round(nx * sx)), 1), max(int(round(ny * sy)), 1)
    canvas = cv2.cvtColor(cv2.resize(_grey(image), (W, H), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
    missing = cv2.resize((~np.isfinite(image)).astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
    if missing.any():
        # lines not acquired: diagonal hatching, never black data
        yy, xx = np.indices((H, W))
        stripe = ((xx + yy) // max(4, W // 80)) % 2 == 0
        canvas[missing & stripe] = (70, 55, 55)
        canvas[missing & ~stripe] = (40, 32, 32)
    species = [s for s in result.counts]
    colours = species_colours(species)
    thick = max(1, int(round(W / 500)))
    for det in result.detections:
        x, y, w, h = det.bbox_px
        p0 = (int(round(x * sx)), int(round(y * sy)))
        p1 = (int(round((x + w) * sx)), int(round((y + h) * sy)))
        col = colours.get(det.species, _OTHER_BGR)
        if det.touches_edge:
            cv2.rectangle(canvas, p0, p1, (90, 90, 90), 1, cv2.LINE_AA)
            continue
        cv2.rectangle(canvas, p0, p1, col, thick, cv2.LINE_AA)
    # Scale bar: about a fifth of the width, bottom left, with a dark halo.
    bar_nm = _nice_length(w_nm / 5)
    bar_px = int(round(bar_nm / dx * sx))
    x0, y0 = int(0.04 * W), int(H - 0.05 * H)
    bar_h = max(4, H // 120)
    cv2.rectangle(canvas, (x0 - 2, y0 - bar_h - 2), (x0 + bar_px + 2, y0 + 2), (0, 0, 0), -1)
    cv2.rectangle(canvas, (x0, y0 - bar_h), (x0 + bar_px, y0), (255, 255, 255), -1)
    label = f"{bar_nm:g} nm"
    fs = max(0.5, W / 1400)
    cv2.putText(canvas, label, (x0, y0 - bar_h - 8), cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(canvas, label, (x0, y0 - bar_h - 8), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)
    # Legend strip on the right.
    legend_w = max(260, W // 3)
    legend = np.full((H, legend_w, 3), 30, np.uint8)
    line = int(34 * fs / 0.5 * 0.7) + 10
    ytxt = line
    cv2.putText(legend, "counts", (12, ytxt), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)
    for s in species:
        ytxt += line
        cv2.rectangle(legend, (12, ytxt - int(line * 0.6)), (12 + int(line * 0.6), ytxt), colours[s], -1)
        cv2.putText(legend, f"{s}: {result.counts[s]}", (24 + int(line * 0.6), ytxt),
                    cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)
    n_edge = sum(1 for d in result.detections if d.touches_edge)
    ytxt += line
    cv2.putText(legend, f"edge (not counted): {n_edge}", (12, ytxt), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.8,
                (170, 170, 170), 1, cv2.LINE_AA)
    ytxt += line
    enc = result.encoder_label
    cv2.putText(legend, f"encoder: {enc}", (12, ytxt), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.8, (170, 170, 170), 1,
                cv2.LINE_AA)
    det = result.detection or {}
    extra = [f"channel: {result.channel}"] if result.channel else []
    if det.get("method"):
        size = det.get("object_size_nm")
        extra.append(f"detector: {det['method']}" + (f", objects {size:.3g} nm" if size else ""))
        if size and det.get("size_source"):
            extra.append(f"  size: {det['size_source']}")
    if det.get("note"):
        extra.append(str(det["note"]))
    if missing.any():
        extra.append(f"hatched: not acquired ({missing.mean():.0%})")
    for text in extra:
        ytxt += line
        cv2.putText(legend, _fit(text, fs * 0.8, legend_w - 20), (12, ytxt), cv2.FONT_HERSHEY_SIMPLEX, fs * 0.8,
                    (170, 170, 170), 1, cv2.LINE_AA)
    return np.concatenate([canvas, legend], axis=1)


def _fit(text: str, font_scale: float, width_px: int) -> str:
    """``text`` cut (with "...") to fit ``width_px`` in Hershey simplex at ``font_scale``."""
    def w(t: str) -> int:
        return cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)[0][0]
    if w(text) <= width_px:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if w(text[:mid] + "...") <= width_px else (lo, mid - 1)
    return text[:lo] + "..."


def write_result_files(result: FrameResult, out_dir: Path, stem: str, *, write_json: bool = True,
                       write_overlay: bool = True, roots: Roots | None = None, make_dirs: bool = True) -> list[Path]:
    """Write ``<stem>.stm-agent.json`` and ``<stem>.stm-agent.png`` into ``out_dir``.

    The JSON is ``result.to_json()``. The overlay needs ``result.image`` (the flattened frame) and
    the pixel size in ``result.scan["pixel_size_nm"]``; it is skipped for error results. Each file
    is written with :func:`adapters.files.write_new`: atomically (temporary name, then rename),
    never through a symlink planted at either name, mode 0640.

    Parameters
    ----------
    roots : Roots, optional
        Write roots ``out_dir`` must resolve into (the agent's results folders and acquisition
        roots); None = ``out_dir`` was given explicitly (``--out``, or next to a scan a user named).
    make_dirs : bool
        Create ``out_dir`` when missing (inside ``roots`` only, when given).

    Returns
    -------
    list[Path]
        The files written.

    Raises
    ------
    RefusedPathError
        ``out_dir`` is outside ``roots``, or missing and may not be created.
    OSError
        ``out_dir`` cannot be created or written.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    if write_json:
        blob = json.dumps(result.to_json(), indent=1).encode("utf-8")
        written.append(write_new(out_dir, f"{stem}.stm-agent.json", blob, roots=roots, make_dirs=make_dirs,
                                 mode=FILE_MODE))
    if write_overlay and result.status == "ok" and result.image is not None:
        px = tuple(result.scan.get("pixel_size_nm") or (1.0, 1.0))
        png = render_overlay(result, result.image, (float(px[0]), float(px[1])))
        ok, buf = cv2.imencode(".png", png)
        if not ok:
            raise OSError(f"{out_dir / (stem + '.stm-agent.png')}: could not encode the overlay PNG")
        written.append(write_new(out_dir, f"{stem}.stm-agent.png", buf.tobytes(), roots=roots,
                                 make_dirs=make_dirs, mode=FILE_MODE))
    return written
