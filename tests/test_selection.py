"""UniMR adaptive encoder selection on real crops: it really switches encoders."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from stm_agent.agent.config import NormaliseConfig
from stm_agent.agent.normalise import make_poses, to_grey
from stm_agent.agent.selection import max_similarity, peak_separation, select_encoder, select_from_encoders
from stm_agent.models.pixel import PixelEncoder
from stm_agent.models.zernike import ZernikeEncoder

CFG = NormaliseConfig(size_px=64)


@pytest.fixture(scope="module")
def species(labelled_dir) -> dict[str, np.ndarray]:
    out = {}
    for sub in ("FHPB/L", "Monoradical/chiral", "Monoradical/others"):
        files = sorted((labelled_dir / "crops" / sub).iterdir())
        x = np.stack([cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (64, 64),
                                 interpolation=cv2.INTER_AREA).astype(np.float32) for f in files])
        out[sub] = to_grey(x, CFG)
    return out


def _select(ref: np.ndarray, queries: np.ndarray, order=("pixel", "zernike")):
    poses, _, _ = make_poses(ref, CFG)
    poses = poses.reshape(-1, 64, 64)
    encs = {"pixel": PixelEncoder(64), "zernike": ZernikeEncoder(64)}
    encs = {k: encs[k] for k in order}
    return select_from_encoders(encs, queries, {k: e.embed(poses) for k, e in encs.items()})


def test_switches_between_encoders_on_real_crops(species):
    """Two real scenes, the same two encoders: the selection picks pixel in one and Zernike in the other.

    Scene A: reference = one 'Monoradical/others' molecule, queries = the other 'others' + the
    'chiral' monoradicals (similar-looking molecules of one system). Scene B: reference = one
    chiral monoradical, queries = the other chiral ones + F-HPB molecules (a structurally
    distinct second species). The choice must not depend on the order of the candidates.
    """
    o, c, l = species["Monoradical/others"], species["Monoradical/chiral"], species["FHPB/L"]
    a_q = np.concatenate([o[1:], c])
    b_q = np.concatenate([c[1:], l])
    for order in (("pixel", "zernike"), ("zernike", "pixel")):
        sel_a, _ = _select(o[:1], a_q, order)
        sel_b, _ = _select(c[:1], b_q, order)
        assert sel_a.chosen == "pixel", sel_a.to_json()
        assert sel_b.chosen == "zernike", sel_b.to_json()
    sa = {k: v.score for k, v in sel_a.scores.items()}
    assert sa["pixel"] > 1.1 * sa["zernike"]
    j = sel_b.to_json()
    assert j["chosen"] == "zernike" and set(j["scores"]) == {"pixel", "zernike"}
    assert j["scores"]["pixel"]["n_queries"] == len(b_q)


def test_peak_heights_follow_the_formula(species):
    """Score = |w0/(sqrt(2pi) s0) - w1/(sqrt(2pi) s1)| of sklearn's GMM(2, random_state=42)."""
    l, o = species["FHPB/L"], species["Monoradical/others"]
    enc = PixelEncoder(64)
    poses, _, _ = make_poses(l[:1], CFG)
    s = max_similarity(enc.embed(np.concatenate([l[1:], o])), enc.embed(poses.reshape(-1, 64, 64)))
    assert s.shape == (len(l) - 1 + len(o),) and s.max() <= 1 + 1e-6
    ps = peak_separation(s)
    g = GaussianMixture(2, random_state=42).fit(s[:, None])
    h = g.weights_ / (math.sqrt(2 * math.pi) * np.sqrt(g.covariances_.ravel()))
    assert ps.score == pytest.approx(abs(h[0] - h[1]), rel=1e-9)
    assert ps.means[0] < ps.means[1] and ps.reason is None
    # the two populations (F-HPB queries match the F-HPB reference, others do not) are found
    assert ps.means[0] < 0.3 < ps.means[1]


def test_degenerate_inputs_fall_back():
    one = np.ones((1, 4), np.float32) / 2
    refs = np.eye(4, dtype=np.float32)
    sel = select_encoder({"pixel": (one, refs), "clip": (one, refs)}, fallback="clip")
    assert sel.chosen == "clip" and sel.reason.startswith("fallback")
    assert math.isnan(sel.scores["pixel"].score) and "1 queries" in sel.scores["pixel"].reason
    same = np.tile(one, (5, 1))
    sel = select_encoder({"pixel": (same, refs), "clip": (same, refs)})
    assert sel.chosen == "pixel" and "no spread" in sel.scores["clip"].reason
    assert sel.to_json()["scores"]["pixel"]["score"] is None
    # an encoder with a finite score beats a degenerate one
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, 4)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sel = select_encoder({"pixel": (same, refs), "clip": (q, refs[:2])})
    assert sel.chosen == "clip" and sel.reason == "max peak separation"
    with pytest.raises(ValueError):
        select_encoder({})
    with pytest.raises(ValueError):
        max_similarity(q, np.zeros((3, 5), np.float32))
