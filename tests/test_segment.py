"""Segmentation on real scans and on the labelled real images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stm_agent.adapters.labelled import box_iou, image_scan, load_coco, match_boxes
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.config import AgentConfig, SegmentConfig
from stm_agent.agent.flatten import flatten
from stm_agent.agent.pipeline import detect
from stm_agent.agent.segment import MIN_SPECK_PX, auto_area_window, segment, signed_mask, threshold_mask


@pytest.fixture(scope="module")
def au111(sxm_dir):
    scan = read_sxm(sxm_dir / "au111_adsorbates_10nm_256_up.sxm")
    return scan, flatten(scan.frame("Z"))


def _touches_border(r, shape) -> bool:
    x, y, w, h = r.bbox_px
    return x == 0 or y == 0 or x + w >= shape[1] or y + h >= shape[0]


def test_au111_adsorbates_counted_and_edge_flagged(au111):
    scan, img = au111
    regions = segment(img, scan.pixel_size_nm, SegmentConfig())
    inner = [r for r in regions if not r.touches_edge]
    edge = [r for r in regions if r.touches_edge]
    # by eye: 3 whole adsorbates inside the 10 nm frame, 5 cut by the border
    assert 2 <= len(inner) <= 4
    assert len(edge) >= 3
    assert all(_touches_border(r, img.shape) for r in edge)
    assert not any(_touches_border(r, img.shape) for r in inner)
    for r in inner:  # adsorbates ~2 nm across
        assert 2.0 < r.area_nm2 < 6.0
        assert 1.5 < r.extent_nm < 3.5
        assert r.area_nm2 == pytest.approx(r.area_px * scan.pixel_size_nm[0] * scan.pixel_size_nm[1])
        x, y, w, h = r.bbox_px
        assert x <= r.centroid_px[0] <= x + w and y <= r.centroid_px[1] <= y + h
        assert r.contains(*r.centroid_px)


def test_nan_boundary_of_incomplete_scan_flags_cut_objects(au111):
    scan, img = au111
    whole = [r for r in segment(img, scan.pixel_size_nm, SegmentConfig()) if not r.touches_edge]
    # simulate an aborted scan: lines below row 90 never acquired (cuts the object spanning 50..110)
    cut = img.copy()
    cut[90:] = np.nan
    regions = segment(cut, scan.pixel_size_nm, SegmentConfig())
    cut_obj = [r for r in regions if r.bbox_px[1] < 90 < r.bbox_px[1] + r.bbox_px[3] + 1]
    assert any(r.bbox_px[1] < 90 < r.bbox_px[1] + r.bbox_px[3] for r in whole)
    assert cut_obj and all(r.touches_edge for r in cut_obj)
    assert all(r.bbox_px[1] + r.bbox_px[3] <= 90 for r in regions)  # nothing found in the NaN rows
    # an object far from the NaN rows stays unflagged
    assert any(not r.touches_edge and r.bbox_px[1] + r.bbox_px[3] < 85 for r in regions)


def test_configured_size_window(au111):
    scan, img = au111
    none = segment(img, scan.pixel_size_nm, SegmentConfig(min_area_nm2=50.0))
    assert not [r for r in none if not r.touches_edge]
    small = segment(img, scan.pixel_size_nm, SegmentConfig(max_area_nm2=1.0))
    assert all(r.area_nm2 <= 1.0 for r in small)


def test_auto_area_window_is_robust_to_clusters():
    areas = np.r_[np.full(20, 100.0) * np.linspace(0.8, 1.2, 20), 5000.0, 8000.0]
    lo, hi = auto_area_window(areas, 2.0)
    assert lo >= MIN_SPECK_PX and 50 < lo < 80 and 130 < hi < 1000
    # plain mean +- 2 sd of the raw areas would give a negative lower bound here
    assert areas.mean() - 2 * areas.std() < 0


def test_segmentation_recall_on_labelled_images(labelled_dir):
    cfg = AgentConfig()
    figures = {}
    for name in ("sparse", "fhpb"):
        images, _ = load_coco(labelled_dir / name)
        gt = hit = iou50 = 0
        for im in images:
            img, regions = detect(image_scan(im.path, 1.0), cfg)
            db = np.array([r.bbox_px for r in regions], float).reshape(-1, 4)
            dc = np.array([r.centroid_px for r in regions], float).reshape(-1, 2)
            gt += len(im.boxes)
            hit += int((match_boxes(db, dc, im.boxes) >= 0).sum())
            iou50 += int((box_iou(db, im.boxes).max(axis=0) >= 0.5).sum())
        figures[name] = (hit / gt, iou50 / gt)
    print("segmentation recall (any match, IoU>=0.5):", figures)
    # sparse: measured 67/68 = 0.99 (IoU>=0.5: 0.59, the boxes are drawn larger than the bright core)
    assert figures["sparse"][0] >= 0.93
    assert figures["sparse"][1] >= 0.45
    # fhpb dense monolayer: threshold segmentation splits every molecule into its bright lobes
    # (centroid-inside matches 1.00, but IoU>=0.5 is 0.00): recorded, not asserted as a success.


# ---------------------------------------------------------------------------------------------
# polarity: both (protrusions and depressions in one pass), on the wse2_defects point defects
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wse2(labelled_dir):
    images, _ = load_coco(labelled_dir / "wse2_defects")
    return [(im, flatten(image_scan(im.path, 1.0).frame("Z"))) for im in images]


def _recall_by_kind(frames, cfg: SegmentConfig) -> dict:
    """Detection recall of the Peak and Trough boxes (inner regions, centroid-inside or IoU>=0.5),
    and which contrast sign matched each kind: {kind: (hit, total, {sign: n})}."""
    out = {"Peak": [0, 0, {1: 0, -1: 0}], "Trough": [0, 0, {1: 0, -1: 0}]}
    for im, img in frames:
        regions = [r for r in segment(img, (1.0, 1.0), cfg) if not r.touches_edge]
        db = np.array([r.bbox_px for r in regions], float).reshape(-1, 4)
        dc = np.array([r.centroid_px for r in regions], float).reshape(-1, 2)
        m = match_boxes(db, dc, im.boxes)
        for r, j in zip(regions, m):
            if j >= 0:
                kind = "Trough" if "Trough" in im.labels[j] else "Peak"
                out[kind][0] += 1
                out[kind][2][r.contrast] += 1
        for lab in im.labels:
            out["Trough" if "Trough" in lab else "Peak"][1] += 1
    return out


def test_both_polarities_find_the_troughs_bright_misses(wse2):
    bright = _recall_by_kind(wse2, SegmentConfig())
    both = _recall_by_kind(wse2, SegmentConfig(polarity="both"))
    rec = lambda f, k: f[k][0] / f[k][1]  # noqa: E731
    print("bright:", bright, "both:", both)
    assert bright["Trough"][1] == 397 and bright["Peak"][1] == 328  # 397 of 725 boxes are troughs
    # measured: Trough 0.15 -> 0.77, Peak 0.09 -> 0.66 (27 images, Otsu, smooth 1 px)
    assert rec(bright, "Trough") < 0.25 and rec(both, "Trough") > 0.6
    assert rec(both, "Peak") > 0.5 and rec(both, "Peak") >= rec(bright, "Peak")
    # bright can only hit troughs by chance (bright rims, lattice noise): never with a dark region
    assert bright["Trough"][2][-1] == 0 and bright["Peak"][2][-1] == 0
    # with both, troughs are found as depressions, peaks as protrusions (measured 237:67, 211:6)
    assert both["Trough"][2][-1] > 2.5 * both["Trough"][2][1]
    assert both["Peak"][2][1] > 10 * both["Peak"][2][-1]


def test_both_with_value_threshold_is_sparser(wse2):
    # a 4-sd significance threshold on |z - median|: far fewer detections for a similar recall
    # (measured: inner detections 1566 vs 11234 with Otsu, recall 0.67 vs 0.72)
    otsu = _recall_by_kind(wse2, SegmentConfig(polarity="both"))
    val = _recall_by_kind(wse2, SegmentConfig(polarity="both", method="value", threshold=4.0))
    n_otsu = sum(len(segment(img, (1.0, 1.0), SegmentConfig(polarity="both"))) for _, img in wse2)
    n_val = sum(len(segment(img, (1.0, 1.0), SegmentConfig(polarity="both", method="value", threshold=4.0)))
                for _, img in wse2)
    assert n_val < n_otsu / 3
    assert val["Trough"][0] / val["Trough"][1] > 0.55 and val["Peak"][0] / val["Peak"][1] > 0.55
    assert val["Trough"][0] + val["Peak"][0] > 0.85 * (otsu["Trough"][0] + otsu["Peak"][0])


def test_both_region_signs_match_the_image(wse2):
    cfg = SegmentConfig(polarity="both")
    n = {1: 0, -1: 0}
    for _, img in wse2[:8]:
        med = float(np.nanmedian(img))
        signs, valid, (t_dark, t_bright) = signed_mask(img, cfg)
        assert t_dark == t_bright > 0
        mask, _, t = threshold_mask(img, cfg)
        assert np.array_equal(mask, signs != 0) and t == t_dark
        regions = segment(img, (1.0, 1.0), cfg)
        assert len({r.label for r in regions}) == len(regions)
        for r in regions:
            x, y, w, h = r.bbox_px
            inside = signs[y:y + h, x:x + w]
            # the whole region lies on its side of the background in the thresholded image
            own = np.zeros((h, w), np.uint8)
            cv2.drawContours(own, [r.contour.reshape(-1, 1, 2) - np.array([x, y], np.int32)], -1, 1, cv2.FILLED)
            assert set(np.unique(inside[(own > 0) & (inside != 0)])) == {r.contrast}
            # and the raw image: the region's median deviates from the frame median with its sign
            assert np.sign(np.nanmedian(img[y:y + h, x:x + w][own > 0]) - med) == r.contrast
            cx, cy = int(round(r.centroid_px[0])), int(round(r.centroid_px[1]))
            if r.contains(cx, cy) and own[cy - y, cx - x]:
                n[r.contrast] += 1
                assert signs[cy, cx] in (0, r.contrast)
    assert n[1] > 20 and n[-1] > 20  # regions of both signs, checked at their centroids


def test_bright_and_dark_unchanged_by_both(au111, wse2):
    scan, img = au111
    # single-polarity results pinned (measured before `both` existed: 8 bright regions of 14314
    # pixels in all; dark: the terrace between the adsorbates, one region of 51352 pixels)
    for cfg, n, px in ((SegmentConfig(), 8, 14314), (SegmentConfig(polarity="dark"), 1, 51352)):
        regions = segment(img, scan.pixel_size_nm, cfg)
        assert len(regions) == n and sum(r.area_px for r in regions) == px
        assert {r.contrast for r in regions} == {-1 if cfg.polarity == "dark" else 1}
    # au111: bright adsorbates on a flat terrace; both finds them too (each one overlapped by a
    # positive region) and labels them +1
    bright = [r for r in segment(img, scan.pixel_size_nm, SegmentConfig()) if not r.touches_edge]
    both = segment(img, scan.pixel_size_nm, SegmentConfig(polarity="both"))
    for r in bright:
        assert any(b.contrast == 1 and b.contains(*r.centroid_px) for b in both)
