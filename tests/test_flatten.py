"""Flattening (plane + row alignment) on real Nanonis scans."""

from __future__ import annotations

import numpy as np
import pytest

from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.flatten import flatten, plane_fit


def test_sloped_scan_plane_and_rows_removed(sxm_dir):
    # Si(111)-7x7 200 nm overview with a strong background slope.
    z = read_sxm(sxm_dir / "si111_7x7_steps_200nm_256_down.sxm").frame("Z")
    plane_only = flatten(z, plane=True, rows="none")
    full = flatten(z)
    row_spread = lambda a: float(np.nanstd(np.nanmedian(a, axis=1)))  # noqa: E731
    col_spread = lambda a: float(np.nanstd(np.nanmedian(a, axis=0)))  # noqa: E731
    # measured: std 1.05e-9 -> 7.7e-11 m (x13.6), row-median spread x31, column-median spread x15
    assert np.nanstd(z) / np.nanstd(full) > 8
    assert row_spread(z) / row_spread(plane_only) > 10
    assert col_spread(z) / col_spread(full) > 8
    # row alignment: every line's median is the same level
    assert row_spread(full) < 1e-3 * row_spread(z)
    # the residual has no plane left
    assert np.abs(plane_fit(full)).max() < 1e-3 * np.abs(plane_fit(z)).max()
    assert full.dtype == np.float32 and full.shape == z.shape


@pytest.mark.parametrize(
    "name, channel",
    [("porphyrin_dimer_96_up_partial16pct.sxm", "Z"), ("porphyrin_pair_128_up_nan51pct.sxm", "Current")],
)
@pytest.mark.parametrize("rows", ["median", "mean"])
def test_incomplete_scan_nan_rows_stay_nan(sxm_dir, name, channel, rows):
    z = read_sxm(sxm_dir / name).frame(channel)
    nan_rows = ~np.isfinite(z).any(axis=1)
    assert nan_rows.any(), "test scan should be incomplete"
    out = flatten(z, rows=rows)
    # nothing invented for the lines not acquired, and no new NaN elsewhere
    assert np.array_equal(np.isnan(out), np.isnan(z))
    assert np.isnan(out[nan_rows]).all()
    assert np.isfinite(out[~nan_rows]).all()
    level = np.median(out[~nan_rows], axis=1) if rows == "median" else out[~nan_rows].mean(axis=1)
    assert np.ptp(level) < 1e-3 * np.nanstd(z) + 1e-30


def test_exact_recovery_of_plane_and_row_offsets(sxm_dir):
    # a real flattened frame + a known plane and known line offsets -> flatten gives it back
    base = flatten(read_sxm(sxm_dir / "au111_adsorbates_10nm_256_up.sxm").frame("Z"))
    ny, nx = base.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    rng = np.random.default_rng(0)
    tilted = base + 3e-12 * xx - 2e-12 * yy + rng.normal(0, 5e-11, ny)[:, None]
    out = flatten(tilted.astype(np.float32))
    # the base frame's own line medians are 0 after flattening, so it is a fixed point up to float32
    assert np.nanmax(np.abs(out - base)) < 0.02 * np.nanstd(base)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        flatten(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="rows"):
        flatten(np.zeros((4, 4), np.float32), rows="poly")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["si111_7x7_steps_200nm_256_down.sxm", "porphyrin_pair_128_down_nan51pct.sxm"])
def test_plane_fit_equals_least_squares_on_the_pixels(sxm_dir, name):
    """The O(N) normal-equation plane equals numpy's least squares on the finite pixels (real scans,
    one with half its lines not acquired)."""
    z = read_sxm(sxm_dir / name).frame("Z").astype(np.float64)
    ny, nx = z.shape
    ok = np.isfinite(z)
    yy, xx = np.nonzero(ok)
    a = np.column_stack([np.ones(len(xx)), xx - (nx - 1) / 2, yy - (ny - 1) / 2])
    c, *_ = np.linalg.lstsq(a, z[ok], rcond=None)
    gy, gx = np.mgrid[0:ny, 0:nx]
    ref = c[0] + c[1] * (gx - (nx - 1) / 2) + c[2] * (gy - (ny - 1) / 2)
    assert np.abs(plane_fit(z) - ref).max() <= 1e-9 * np.abs(ref).max()
