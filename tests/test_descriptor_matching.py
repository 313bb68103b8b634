"""Physical descriptors inside matching (``match.descriptor_weight``) on real data."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent import descriptors as D
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.match import assign, species_scores
from stm_agent.agent.normalise import normalise_crops
from stm_agent.agent.pipeline import Recognizer, detect, reference_crop_at
from stm_agent.agent.references import object_extent_nm, window_nm
from stm_agent.models.pixel import PixelEncoder
from tests.helpers import CountingEncoder


@pytest.fixture(scope="module")
def au111(sxm_dir):
    return read_sxm(sxm_dir / "au111_adsorbates_10nm_256_up.sxm")


def _library(folder, scan, n_species=2):
    cfg = AgentConfig()
    cfg.references.folder = folder
    # the descriptor arithmetic is checked bit for bit on one fixed segmentation: Otsu regions do not
    # depend on the references (the scale detector takes its object size from them)
    cfg.segment.method = "otsu"
    _, regions = detect(scan, cfg)
    inner = [r for r in regions if not r.touches_edge]
    lib = ReferenceLibrary(folder)
    for species, r in zip(("A", "B", "C")[:n_species], inner):
        crop, ps, prov = reference_crop_at(scan, *r.centroid_px, cfg, units="px")
        lib.add(species, crop, ps, prov)
    return cfg, lib, inner


def test_weight_zero_is_todays_pipeline(tmp_path, au111):
    cfg, lib, _ = _library(tmp_path / "refs", au111)
    cfg.match.descriptor_weight = 0.0
    cfg.match.size_tolerance = None
    rec = Recognizer.from_config(cfg)
    assert rec.refs.desc_std is None  # w = 0: no descriptor is computed
    res = rec.recognise(au111)
    assert "describe" not in res.timings_ms
    # the same scores as the embedding-only computation (each object windowed from its own extent),
    # to float32 rounding: the pipeline runs BLAS on one thread, which changes the summation order
    image, regions = detect(au111, cfg)
    centres = np.array([r.centroid_px for r in regions])
    wins = window_nm(object_extent_nm([r.bbox_px for r in regions], au111.pixel_size_nm), cfg.normalise)
    grey = normalise_crops(image, centres, wins, au111.pixel_size_nm, cfg.normalise)
    scores, best = species_scores(PixelEncoder(64).embed(grey), rec.refs)
    names, sim, _ = assign(scores, best, rec.refs, res.encoder["threshold"]["value"], cfg.match.ratio)
    assert [d.species for d in res.detections] == names
    np.testing.assert_allclose(np.array([d.similarity for d in res.detections], np.float32), sim, rtol=0, atol=1e-6)
    got = np.array([[d.scores[s] for s in rec.refs.species] for d in res.detections])
    np.testing.assert_allclose(got, scores, rtol=0, atol=1e-6)


def test_weight_in_the_pipeline(tmp_path, au111):
    cfg, lib, inner = _library(tmp_path / "refs", au111)
    meta = json.loads(lib.entries()[0].path.with_suffix(".json").read_text())["descriptors"]
    assert meta["version"] == D.DESCRIPTOR_VERSION and meta["height_unit"] == "pm" and meta["height"] > 0
    assert meta["area_nm2"] == pytest.approx(inner[0].area_nm2, rel=0.2)
    cfg.match.descriptor_weight = 0.3
    rec = Recognizer.from_config(cfg)
    assert rec.refs.desc_std.shape == (2, 4) and rec.refs.height_unit == "pm"
    res = rec.recognise(au111)
    assert res.timings_ms["describe"] >= 0
    # descriptor_weight: auto (the default) is 0.3 on a frame with physical units (.sxm)
    cfg_a = cfg.model_copy(deep=True)
    cfg_a.match.descriptor_weight = "auto"
    res_a = Recognizer.from_config(cfg_a).recognise(au111)
    assert res_a.encoder["descriptor_weight"] == 0.3
    assert [d.scores for d in res_a.detections] == [d.scores for d in res.detections]
    cfg0 = cfg.model_copy(deep=True)
    cfg0.match.descriptor_weight = 0.0
    res0 = Recognizer.from_config(cfg0).recognise(au111)
    # each picked reference object: the query descriptors are measured as the reference's, cos_d = 1
    for k, r in enumerate(inner[:2]):
        d = next(d for d in res.detections if d.centroid_px == r.centroid_px)
        assert d.species == "AB"[k] and d.similarity > 0.99
    s = np.array([list(d.scores.values()) for d in res.detections])
    s0 = np.array([list(d.scores.values()) for d in res0.detections])
    assert not np.allclose(s, s0)
    # the combined cosine is (1 - w) cos_e + w cos_d, so it can only move by w (1 + 1) at most
    assert np.all(np.abs(s - s0) <= 2 * 0.3 + 1e-5)


def test_one_species_ignores_the_weight(tmp_path, au111):
    cfg, _, _ = _library(tmp_path / "refs", au111, n_species=1)
    cfg.match.descriptor_weight = 0.5
    res = Recognizer.from_config(cfg).recognise(au111)
    cfg.match.descriptor_weight = 0.0
    res0 = Recognizer.from_config(cfg).recognise(au111)
    assert [d.scores for d in res.detections] == [d.scores for d in res0.detections]


def test_cache_key_follows_descriptor_settings(tmp_path, au111, monkeypatch):
    cfg, lib, _ = _library(tmp_path / "refs", au111)
    enc = CountingEncoder(64)
    r0 = lib.pose_embeddings(enc, cfg.normalise)
    r1 = lib.pose_embeddings(enc, cfg.normalise, descriptors=True)
    # 2 x 72 poses + the 2 mirrored pose-0 crops of the mirror-invariance test, per call
    assert lib.last_cache_hit is False and r1.key != r0.key and enc.n == 2 * 146
    assert np.array_equal(r0.emb, r1.emb)
    r2 = lib.pose_embeddings(enc, cfg.normalise, descriptors=True)
    assert lib.last_cache_hit is True and enc.n == 2 * 146
    assert np.array_equal(r2.desc_std, r1.desc_std) and r2.height_unit == "pm"
    # the weight is applied at matching time: the cache holds no w, nothing is re-embedded for a new w
    q = r1.emb[::72]
    qd = r1.desc_std[::-1]  # swapped descriptors: w pulls each query towards the other species
    s2, _ = species_scores(q, r1, qd, 0.2)
    s5, _ = species_scores(q, r1, qd, 0.5)
    assert s5[0, 0] < s2[0, 0] and s5[0, 1] > s2[0, 1]
    # other descriptor settings -> another key, recomputed
    monkeypatch.setattr(D, "DESCRIPTOR_SETTINGS", {**D.DESCRIPTOR_SETTINGS, "version": "desc/test"})
    r3 = lib.pose_embeddings(enc, cfg.normalise, descriptors=True)
    assert lib.last_cache_hit is False and r3.key not in (r1.key, r0.key)
    # a reference whose provenance lacks descriptors is measured on its crop (half-maximum mask)
    e = lib.entries()[0]
    meta = json.loads(e.path.with_suffix(".json").read_text())
    seg = meta.pop("descriptors")
    e.path.with_suffix(".json").write_text(json.dumps(meta))
    _, desc, methods = lib.reference_descriptors()
    assert methods == ["crop", "segment"] and desc.height_unit == "pm"
    assert desc.height[0] == pytest.approx(seg["height"], rel=0.25)
    assert desc.feret_nm[0] == pytest.approx(seg["feret_nm"], rel=0.5)


def _eval_module():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_descriptors.py"
    spec = importlib.util.spec_from_file_location("eval_descriptors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wse2_descriptors_separate_large_from_small(labelled_dir):
    """Measured (pixel encoder, 5 refs/class, 5 seeds): macro F1 0.30 at w=0, 0.56 at 0.2, 0.58 at
    0.3, 0.59 at 0.5; Large/Small accuracy 0.67 -> 0.92 / 0.93 / 0.93."""
    ev = _eval_module()
    labels, names, grey, desc = ev.load_wse2(labelled_dir / "wse2_defects")
    assert len(labels) == 725 and grey.shape == (725, 64, 64)
    res = ev.evaluate(labels, names, grey, desc, PixelEncoder(64), [0.0, 0.3], n_refs=5, seeds=3)
    acc0, acc3 = res[0.0]["size_acc"].mean(), res[0.3]["size_acc"].mean()
    f0, f3 = res[0.0]["macro_f1"].mean(), res[0.3]["macro_f1"].mean()
    print(f"Large/Small accuracy w=0 {acc0:.3f}, w=0.3 {acc3:.3f}; macro F1 {f0:.3f} -> {f3:.3f}")
    assert acc3 >= 0.85 and acc3 > acc0 + 0.15
    assert f3 > f0 + 0.15
