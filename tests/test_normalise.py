"""Crop normalisation (window, grey, brightness, poses) and the pixel encoder, on real scans."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.config import NormaliseConfig, SegmentConfig
from stm_agent.agent.flatten import flatten
from stm_agent.agent.normalise import circular_mask, crop_windows, frame_range, make_poses, normalise_crops, to_grey
from stm_agent.agent.segment import segment
from stm_agent.models.pixel import PixelEncoder


@pytest.fixture(scope="module")
def objects(sxm_dir):
    """The flattened Au(111) frame, its pixel size and the centroids of the whole adsorbates."""
    scan = read_sxm(sxm_dir / "au111_adsorbates_10nm_256_up.sxm")
    img = flatten(scan.frame("Z"))
    regs = [r for r in segment(img, scan.pixel_size_nm, SegmentConfig()) if not r.touches_edge]
    assert len(regs) >= 2
    return img, scan.pixel_size_nm, np.array([r.centroid_px for r in regs])


def test_window_is_physical_not_pixels(objects):
    # the same objects in a frame resampled to half the pixel size give the same crops
    img, (dx, dy), cen = objects
    fine = cv2.resize(img, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    a = crop_windows(img, cen, 3.0, (dx, dy), 48)
    b = crop_windows(fine, cen * 2 + 0.5, 3.0, (dx / 2, dy / 2), 48)
    assert a.shape == b.shape == (len(cen), 48, 48) and a.dtype == np.float32
    for u, v in zip(a, b):
        assert np.corrcoef(u.ravel(), v.ravel())[0, 1] > 0.98
    # a wider physical window shows the object smaller: the crops differ
    c = crop_windows(img, cen, 6.0, (dx, dy), 48)
    assert np.corrcoef(a[0].ravel(), c[0].ravel())[0, 1] < 0.9


@pytest.mark.parametrize("contrast", ["crop", "frame"])
def test_grey_and_brightness_correction(objects, contrast):
    img, ps, cen = objects
    cfg = NormaliseConfig(contrast=contrast)
    g = normalise_crops(img, cen, 3.0, ps, cfg)
    m = circular_mask(cfg.size_px)
    assert g.dtype == np.uint8 and g.shape == (len(cen), 64, 64)
    means = g[:, m].mean(axis=1)
    assert np.all(np.abs(means - 120) <= 20 + 1)  # UniMR: mean grey 120 +- 20
    assert np.all(g[:, ~m] == 120)  # outside the circular mask: the mean grey
    assert np.all(g[:, m].std(axis=1) > 20)  # the object is visible, not flattened away
    # a dark crop (mean far below 120) is scaled up to 120
    dark = to_grey(crop_windows(img, cen, 3.0, ps, 64), cfg, value_range=(float(np.nanmin(img)), 10 * float(np.nanmax(img))))
    assert np.all(np.abs(dark[:, m].mean(axis=1) - 120) <= 2)


def test_frame_range_ignores_nan(objects):
    img = objects[0].copy()
    img[:40] = np.nan
    lo, hi = frame_range(img)
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi


def test_poses_rotate_and_mirror(objects):
    img, ps, cen = objects
    cfg = NormaliseConfig()
    g = normalise_crops(img, cen, 3.0, ps, cfg)
    poses, ang, mir = make_poses(g, cfg)
    assert poses.shape == (len(cen), 72, 64, 64) and poses.dtype == np.uint8
    assert np.allclose(ang[:36], np.arange(36) * 10) and not mir[:36].any() and mir[36:].all()
    m = circular_mask(64)
    inner = circular_mask(64) & (np.hypot(*(np.mgrid[0:64, 0:64] - 31.5)) < 28)
    assert np.array_equal(poses[:, 0][:, m], g[:, m])
    # pose 9 (90 deg) = counter-clockwise quarter turn; pose 36 = left-right mirror
    assert np.abs(poses[:, 9][:, inner].astype(int) - np.rot90(g, 1, axes=(1, 2))[:, inner]).max() <= 2
    assert np.array_equal(poses[:, 36][:, m], g[:, :, ::-1][:, m])
    no_mirror = make_poses(g, NormaliseConfig(mirror=False, rotations=8))
    assert no_mirror[0].shape[1] == 8 and not no_mirror[2].any()


def test_pixel_encoder(objects):
    img, ps, cen = objects
    cfg = NormaliseConfig()
    enc = PixelEncoder(cfg.size_px)
    assert "64" in enc.id and enc.dim == int(circular_mask(64).sum())
    g = normalise_crops(img, cen, 3.0, ps, cfg)
    poses, ang, _ = make_poses(g, cfg)
    e = enc.embed(poses[0])
    assert e.dtype == np.float32 and e.shape == (72, enc.dim)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    # a crop rotated by 120 deg (outside the grid the references use) is found at the nearest pose
    rot = cv2.warpAffine(g[0], cv2.getRotationMatrix2D((31.5, 31.5), 122.0, 1.0), (64, 64), borderValue=120)
    rot[~circular_mask(64)] = 120
    sim = enc.embed(rot[None]) @ e.T
    assert abs(float(ang[int(np.argmax(sim))]) - 120) <= 10 and sim.max() > 0.95
    assert enc.embed(np.full((1, 64, 64), 120, np.uint8)).sum() == 0  # uniform crop -> zero row
    with pytest.raises(ValueError, match="expected crops"):
        enc.embed(np.zeros((2, 32, 32), np.uint8))
