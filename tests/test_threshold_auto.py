"""``match.threshold: auto`` (agent.threshold): conformal threshold from the frame's background,
ratio test, size gate, and what a frame result says about them; on real scans."""

from __future__ import annotations

import numpy as np
import pytest

from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.config import AgentConfig, load_config
from stm_agent.agent.domain import OTHER
from stm_agent.agent.errors import ConfigError
from stm_agent.agent.pipeline import Recognizer, detect, reference_crop_at
from stm_agent.agent.threshold import background_centres, conformal_threshold, decide, interstitial_centres


def test_conformal_threshold_is_the_p_value_rule():
    rng = np.random.default_rng(1)
    for n in (19, 20, 48, 200):
        z = rng.normal(0.3, 0.1, n)
        for alpha in (0.05, 0.1, 0.2):
            t = conformal_threshold(z, alpha)
            p = lambda s: (1 + np.sum(z >= s)) / (n + 1)  # noqa: E731  Bates et al. 2023
            assert p(t) <= alpha                      # accepted at the threshold ...
            assert p(t - 2e-6) > alpha                # ... and not just below it: the smallest such score
    # too few null scores for the level: the largest one
    assert conformal_threshold([0.1, 0.4, 0.2], 0.05) == pytest.approx(0.4, abs=1e-5)
    assert conformal_threshold([], 0.05) == -1.0


def test_decide_ratio_test_and_missing_species():
    s = np.array([[0.90, 0.30], [0.80, 0.79], [-1.0, -1.0]])
    best, ok = decide(s, 0.5, ratio=0.9)
    assert best.tolist()[:2] == [0, 0] and ok.tolist() == [True, False, False]
    # one species: no ratio test
    assert decide(s[:, :1], -1.0, ratio=0.5)[1].tolist() == [True, True, False]


def test_background_windows_avoid_objects():
    boxes = np.array([[10, 10, 20, 20], [60, 70, 10, 10]], float)
    c = background_centres((100, 100), boxes, window_px=16, n_max=500)
    assert len(c) > 10
    for x, y, w, h in boxes:  # no centre within a quarter window of a box
        inside = (c[:, 0] > x - 4) & (c[:, 0] < x + w + 4) & (c[:, 1] > y - 4) & (c[:, 1] < y + h + 4)
        assert not inside.any()
    assert len(background_centres((100, 100), boxes, 16, n_max=7)) == 7
    # a frame covered by objects has no background window
    assert len(background_centres((50, 50), np.array([[0, 0, 50, 50]], float), 16)) == 0


def test_windows_between_objects_of_a_real_monolayer(labelled_dir):
    """F-HPB monolayer (real image, labelled boxes): no background window, but windows centred
    between the molecules, each farther from every molecule centre than a quarter window."""
    from stm_agent.adapters.labelled import load_labelled

    im = load_labelled(labelled_dir / "fhpb").images[0]
    win = 1.3 * float(np.median(im.boxes[:, 2:].max(axis=1)))
    shape = (im.height, im.width)
    assert len(background_centres(shape, im.boxes, win)) < 19
    c = interstitial_centres(shape, im.boxes, win)
    assert len(c) >= 19
    centres = im.boxes[:, :2] + im.boxes[:, 2:] / 2
    d = np.linalg.norm(c[:, None, :] - centres[None, :, :], axis=2).min(axis=1)
    assert d.min() >= win / 4 - 1
    assert (c >= win / 2 - 1).all() and (c[:, 0] <= im.width - win / 2 + 1).all() and (c[:, 1] <= im.height - win / 2 + 1).all()
    # sparse objects: no vertex in a frame with fewer than three objects
    assert len(interstitial_centres(shape, im.boxes[:2], win)) == 0


@pytest.fixture(scope="module")
def au_library(tmp_path_factory, sxm_dir):
    """One reference: the largest whole adsorbate of the Au(111) scan."""
    scan = read_sxm(sxm_dir / "au111_adsorbates_10nm_256_up.sxm")
    cfg = AgentConfig()
    cfg.references.folder = tmp_path_factory.mktemp("au") / "refs"
    _, regions = detect(scan, cfg)
    inner = sorted((r for r in regions if not r.touches_edge), key=lambda r: -r.area_px)
    ref = inner[0]
    crop, ps, prov = reference_crop_at(scan, *ref.centroid_px, cfg, units="px")
    ReferenceLibrary(cfg.references.folder).add("Au_adsorbate", crop, ps, prov)
    return cfg, scan, ref


def test_auto_threshold_accepts_its_species_and_rejects_another(au_library, sxm_dir):
    """The reference's own species, in objects OTHER than the reference crop, is accepted (the other
    whole adsorbates of the scan: similarity >= 0.95 against a threshold set by the background
    windows); TCNE molecules (the 4 nm Cu(111) scan, the graphene monolayer) come out `other`.
    Measured: that rejection is mostly the size gate's (TCNE found at 1.5 nm against 2.6 nm);
    the background threshold alone does not reject a compact molecule of another species: TCNE of
    the 6 nm Cu(111) scan, found at 2.0-2.4 nm, is taken for the adsorbate (2 of 3)."""
    cfg, scan, ref = au_library
    rec = Recognizer.from_config(cfg)
    res = rec.recognise(scan)
    thr = res.encoder["threshold"]
    assert thr["mode"] == "auto" and thr["method"].startswith("conformal") and thr["n_null"] >= 5
    others = [d for d in res.detections if not d.touches_edge
              and np.hypot(d.centroid_px[0] - ref.centroid_px[0], d.centroid_px[1] - ref.centroid_px[1]) > 5]
    assert len(others) >= 1
    assert all(d.species == "Au_adsorbate" and d.similarity >= thr["value"] for d in others)
    for name in ("cu111_tcne_molecules_4nm_256_up.sxm", "graphene_tcne_monolayer_4nm_256_down.sxm"):
        other = rec.recognise(read_sxm(sxm_dir / name))
        counted = [d for d in other.detections if not d.touches_edge]
        print(name, other.counts, other.encoder["threshold"])
        assert counted and other.counts["Au_adsorbate"] == 0 and other.counts[OTHER] == len(counted)


def test_a_fixed_number(au_library):
    cfg, scan, _ = au_library
    fixed = cfg.model_copy(deep=True)
    fixed.match.threshold = 0.99
    res = Recognizer.from_config(fixed).recognise(scan)
    assert res.encoder["threshold"] == {"mode": "fixed", "value": 0.99, "method": "fixed", "ratio": 0.98}
    assert all(d.species == OTHER for d in res.detections if d.similarity < 0.99)


def test_old_threshold_mode_key_gets_a_message(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("match:\n  threshold_mode: gmm\n")
    with pytest.raises(ConfigError, match="threshold_mode was replaced by match.threshold: auto"):
        load_config(p)
    with pytest.raises(ConfigError, match="threshold"):
        load_config(overrides={"match": {"threshold": 1.5}})
    assert load_config(overrides={"match": {"threshold": 0.8}}).match.threshold == 0.8
