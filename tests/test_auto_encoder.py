"""``encoder.name: auto`` in the pipeline: UniMR adaptive encoder selection (step 5, Cao et al.,
Adv. Sci. 2025) on real Nanonis scans, with pixel + zernike candidates (no CLIP model folder).

Measured (reference = first whole adsorbate of au111_adsorbates_10nm_256_up.sxm, 8 objects):
pixel score 0.54, zernike 4.02 -> zernike; on cu111_tcne_molecules_4nm_256_up.sxm (3 objects)
with the same reference: pixel 121.8, zernike 1.8 -> pixel. So ``per_frame`` switches between these
two frames and ``once`` must not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.domain import OTHER
from stm_agent.agent.pipeline import Recognizer, detect, reference_crop_at

AU = "au111_adsorbates_10nm_256_up.sxm"
TCNE = "cu111_tcne_molecules_4nm_256_up.sxm"


@pytest.fixture(scope="module")
def scans(sxm_dir):
    return read_sxm(sxm_dir / AU), read_sxm(sxm_dir / TCNE)


@pytest.fixture(scope="module")
def library(tmp_path_factory, scans):
    """A library with one reference: the first whole adsorbate of the Au(111) scan."""
    folder = tmp_path_factory.mktemp("auto") / "refs"
    scan = scans[0]
    cfg = AgentConfig()
    cfg.segment.method = "otsu"
    _, regions = detect(scan, cfg)
    ref = next(r for r in regions if not r.touches_edge)
    crop, ps, prov = reference_crop_at(scan, *ref.centroid_px, cfg, units="px")
    ReferenceLibrary(folder).add("adsorbate", crop, ps, prov)
    return folder


def _cfg(folder, name="auto", select="per_frame") -> AgentConfig:
    cfg = AgentConfig()
    # encoder selection is measured on the released Otsu regions (8 and 3 objects, as above); the
    # scale detector finds the 2 whole TCNE molecules, too few for a two-peak separation
    cfg.segment.method = "otsu"
    cfg.references.folder = folder
    cfg.encoder.name = name
    cfg.encoder.select = select
    return cfg


def _score(res, name):
    return res.encoder["scores"][name]["score"]


def test_auto_reports_selection_and_matches_like_the_chosen_encoder(library, scans):
    rec = Recognizer.from_config(_cfg(library))
    assert set(rec.candidates) == {"pixel", "zernike"}
    # one cached pose-embedding file per candidate encoder id
    assert len(list((library / ".cache").glob("*.npz"))) >= 2
    for scan in scans:
        res = rec.recognise(scan)
        enc = res.encoder
        print(scan.source.rsplit("/", 1)[-1], enc["chosen"], {k: v["score"] for k, v in enc["scores"].items()})
        assert enc["name"] == "auto" and enc["select"] == "per_frame"
        assert enc["reason"] == "max peak separation"
        assert set(enc["scores"]) == {"pixel", "zernike"}
        n = len(res.detections)
        for name in ("pixel", "zernike"):
            s = enc["scores"][name]
            assert s["n_queries"] == n and math.isfinite(s["score"]) and s["score"] >= 0
        # the chosen encoder is the one with the larger UniMR peak separation
        other = "pixel" if enc["chosen"] == "zernike" else "zernike"
        assert _score(res, enc["chosen"]) > _score(res, other)
        # matching is exactly what that encoder alone gives
        fixed = Recognizer.from_config(_cfg(library, name=enc["chosen"]))
        ref = fixed.recognise(scan)
        assert enc["id"] == ref.encoder["id"] == fixed.encoder.id
        assert res.counts == ref.counts
        assert [d.species for d in res.detections] == [d.species for d in ref.detections]
        np.testing.assert_allclose([d.similarity for d in res.detections],
                                   [d.similarity for d in ref.detections], atol=1e-6)
    # real scans on which the selection goes different ways (measured, see the module docstring)
    au, tcne = (rec.recognise(s) for s in scans)
    assert au.encoder["chosen"] == "zernike" and au.counts["adsorbate"] >= 2
    assert tcne.encoder["chosen"] == "pixel"


def test_select_once_keeps_the_encoder(library, scans, monkeypatch):
    au, tcne = scans
    rec = Recognizer.from_config(_cfg(library, select="once"))
    first = rec.recognise(au)
    assert first.encoder["chosen"] == "zernike" and first.encoder["select"] == "once"
    assert first.encoder["selected_on"] == au.frame_id
    assert set(first.encoder["scores"]) == {"pixel", "zernike"}
    # later frames: the pixel candidate is not run any more
    pixel_enc = rec.candidates["pixel"][0]
    calls = []
    monkeypatch.setattr(pixel_enc, "embed", lambda crops: calls.append(len(crops)) or pytest.fail("pixel embedded"))
    second = rec.recognise(tcne)  # per_frame would choose pixel here
    assert calls == []
    assert second.encoder["chosen"] == "zernike" and second.encoder["locked"] is True
    assert second.encoder["selected_on"] == au.frame_id
    assert second.encoder["scores"] == first.encoder["scores"]  # the scores of the selecting frame
    ref = Recognizer.from_config(_cfg(library, name="zernike")).recognise(tcne)
    assert second.counts == ref.counts
    assert [d.species for d in second.detections] == [d.species for d in ref.detections]


def test_select_once_waits_for_two_objects(library, scans, sxm_dir):
    # a frame with a single object cannot be selected on (GMM needs >= 2): fallback, not locked
    one = read_sxm(sxm_dir / "hbn_point_defect_96x100_down.sxm")
    rec = Recognizer.from_config(_cfg(library, select="once"))
    res = rec.recognise(one)
    assert len(res.detections) < 2
    assert res.encoder["chosen"] == "pixel" and res.encoder["reason"].startswith("fallback")
    assert all(v["score"] is None for v in res.encoder["scores"].values())
    assert rec.locked is None and "locked" not in res.encoder
    assert rec.recognise(scans[0]).encoder["chosen"] == "zernike"
    assert rec.recognise(scans[1]).encoder["chosen"] == "zernike"


def test_auto_with_empty_library(tmp_path, scans):
    cfg = _cfg(tmp_path / "none")
    rec = Recognizer.from_config(cfg, allow_empty=True)
    res = rec.recognise(scans[0])
    assert res.counts == {OTHER: res.n_objects} and res.n_objects > 0
    assert all(d.species == OTHER for d in res.detections)
    assert res.encoder["chosen"] == "pixel" and res.encoder["reason"] == "fallback: no references"
    assert set(res.encoder["scores"]) == {"pixel", "zernike"}
