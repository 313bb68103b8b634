"""The overlay PNG a physicist looks at: unacquired lines are hatched, never black data, and the
legend says so; legend lines fit the strip."""

from __future__ import annotations

import numpy as np

from stm_agent.adapters.outputs import _fit, render_overlay
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.config import load_config
from stm_agent.agent.pipeline import Recognizer, flattened_channel


def test_unacquired_lines_are_hatched_not_black(sxm_dir, tmp_path):
    """hBN scan stopped after 15 % of its lines: the missing part is drawn as a two-tone hatch."""
    cfg = load_config(overrides={"references": {"folder": str(tmp_path / "refs")}})
    scan = read_sxm(sxm_dir / "hbn_100nm_144x168_down_nan85pct.sxm")
    result = Recognizer.from_config(cfg, allow_empty=True).recognise(scan)
    _, _, image = flattened_channel(scan, cfg)
    assert 0.8 < (~np.isfinite(image)).mean() < 0.9
    png = render_overlay(result, image, scan.pixel_size_nm)
    H = png.shape[0]
    frame = png[:, :H]  # the image part (square pixels here), left of the legend strip
    low = frame[int(0.6 * H):int(0.9 * H), int(0.3 * H):int(0.9 * H)]  # inside the unacquired part
    colours = {tuple(c) for c in low.reshape(-1, 3)}
    assert colours == {(70, 55, 55), (40, 32, 32)}, colours
    assert not (low == 0).all(axis=-1).any()


def test_legend_lines_are_cut_to_fit():
    long = "size: auto within 0.5-2x the references, and much more text than fits"
    cut = _fit(long, 0.5, 200)
    assert cut.endswith("...") and len(cut) < len(long)
    assert _fit("channel: Z", 0.5, 200) == "channel: Z"
