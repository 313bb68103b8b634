"""The reference library: files, provenance, pose-embedding cache, errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.config import AgentConfig, NormaliseConfig
from stm_agent.agent.errors import NoObjectError, ReferenceLibraryError
from stm_agent.agent.pipeline import detect, reference_crop_at
from stm_agent.models.pixel import PixelEncoder

from tests.helpers import CountingEncoder


@pytest.fixture(scope="module")
def au111(sxm_dir):
    return read_sxm(sxm_dir / "au111_adsorbates_10nm_256_up.sxm")


@pytest.fixture()
def library(tmp_path, au111):
    """A library with two real adsorbates picked from the Au(111) scan (species A and B)."""
    cfg = AgentConfig()
    _, regions = detect(au111, cfg)
    inner = [r for r in regions if not r.touches_edge]
    lib = ReferenceLibrary(tmp_path / "refs")
    for species, r in zip(("A", "B"), inner):
        x_nm, y_nm = au111.px_to_nm(*r.centroid_px)
        crop, ps, prov = reference_crop_at(au111, float(x_nm), float(y_nm), cfg, units="nm")
        lib.add(species, crop, ps, prov)
    return lib


def test_missing_or_empty_library(tmp_path):
    with pytest.raises(ReferenceLibraryError, match="not found") as e:
        ReferenceLibrary(tmp_path / "nope").entries()
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty" / "A").mkdir(parents=True)
    with pytest.raises(ReferenceLibraryError, match="no reference"):
        ReferenceLibrary(tmp_path / "empty").pose_embeddings(PixelEncoder(64), NormaliseConfig())
    assert ReferenceLibrary(tmp_path / "nope").species() == []


def test_add_writes_crop_preview_and_provenance(library, au111):
    assert library.species() == ["A", "B"]
    entries = library.entries()
    assert len(entries) == 2
    for e in entries:
        crop = e.load()
        assert crop.dtype == np.float32 and crop.ndim == 2 and np.isfinite(crop).all()
        assert 1e-11 < float(np.ptp(crop)) < 1e-8  # physical heights (m) are kept
        png = cv2.imread(str(e.path.with_suffix(".png")), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png.shape == crop.shape
        meta = json.loads(e.path.with_suffix(".json").read_text())
        for key in ("scan", "frame_id", "position_nm", "position_px", "pixel_size_nm", "channel", "created", "extent_nm"):
            assert key in meta
        assert meta["frame_id"] == au111.frame_id
        assert e.pixel_size_nm == pytest.approx(au111.pixel_size_nm)
        # crop side = 2 x object extent
        assert crop.shape[1] * e.pixel_size_nm[0] == pytest.approx(2 * e.extent_nm, abs=2 * e.pixel_size_nm[0])


def test_pose_embeddings_cached_and_invalidated(library):
    cfg = NormaliseConfig()
    enc = CountingEncoder(64)
    r1 = library.pose_embeddings(enc, cfg)
    assert r1.mirror and "auto" in r1.mirror_reason  # two unrelated adsorbates: not enantiomers
    assert library.last_cache_hit is False and enc.n == 2 * 72 + 2  # + 2 mirrored pose-0 crops (invariance test)
    assert r1.emb.shape == (144, enc.dim) and r1.emb.dtype == np.float32
    assert r1.species == ["A", "B"] and list(np.bincount(r1.species_idx)) == [72, 72]
    assert r1.mirrored.sum() == 72 and set(np.round(r1.angle_deg)) == set(range(0, 360, 10))
    # each reference is windowed from its own extent: 1.3 x the longer side of its box
    own = [1.3 * max(e.provenance["bbox_px"][2:]) * e.pixel_size_nm[0] for e in library.entries()]
    assert r1.ref_window_nm == pytest.approx(own) and own[0] != pytest.approx(own[1])
    assert r1.window_nm == pytest.approx(max(own))
    assert (library.folder / ".cache" / f"{r1.key}.npz").is_file()
    # second call: from the cache, nothing re-embedded, same numbers
    r2 = library.pose_embeddings(enc, cfg)
    assert library.last_cache_hit is True and enc.n == 146
    assert np.array_equal(r1.emb, r2.emb) and r2.species == r1.species
    # mirror off invalidates (and halves the poses)
    r3 = library.pose_embeddings(enc, NormaliseConfig(mirror=False))
    assert library.last_cache_hit is False and enc.n == 146 + 74 and len(r3.emb) == 72
    # another encoder id invalidates
    other = CountingEncoder(64, tag="/other")
    library.pose_embeddings(other, cfg)
    assert library.last_cache_hit is False and other.n == 146
    # a changed reference file invalidates
    e = library.entries()[0]
    np.save(e.path, e.load() * 2)
    library.pose_embeddings(enc, cfg)
    assert library.last_cache_hit is False


def test_invalid_species_and_crop(tmp_path):
    lib = ReferenceLibrary(tmp_path)
    with pytest.raises(ReferenceLibraryError, match="species"):
        lib.add("other", np.zeros((8, 8)), (0.1, 0.1))
    with pytest.raises(ReferenceLibraryError, match="species"):
        lib.add("../x", np.zeros((8, 8)), (0.1, 0.1))
    with pytest.raises(ReferenceLibraryError, match="finite"):
        lib.add("A", np.full((8, 8), np.nan), (0.1, 0.1))


def test_reference_crop_at_picks_the_object(au111):
    cfg = AgentConfig()
    _, regions = detect(au111, cfg)
    r = [r for r in regions if not r.touches_edge][0]
    # a click a little off the centroid, in pixels, picks the same object
    crop, ps, prov = reference_crop_at(au111, r.centroid_px[0] + 3, r.centroid_px[1] - 2, cfg, units="px")
    assert prov["position_px"] == pytest.approx(list(r.centroid_px))
    assert prov["extent_nm"] == pytest.approx(r.extent_nm)
    # the object sits in the middle of the crop: its brightest part is near the centre
    cy, cx = np.unravel_index(np.argmax(cv2.GaussianBlur(crop, (0, 0), 3)), crop.shape)
    assert abs(cx - crop.shape[1] / 2) < crop.shape[1] / 4 and abs(cy - crop.shape[0] / 2) < crop.shape[0] / 4
    # a click on empty surface far from any object
    with pytest.raises(NoObjectError, match="no object"):
        reference_crop_at(au111, 150, 130, cfg, units="px")


def _crop_library(tmp_path, labelled_dir, pairs):
    """A library of real labelled crops: ``pairs`` = [(species, crops folder, file index)]."""
    from stm_agent.adapters.labelled import read_grey

    lib = ReferenceLibrary(tmp_path / "crops-refs")
    for species, folder, i in pairs:
        f = sorted((labelled_dir / "crops" / folder).iterdir())[i]
        c = read_grey(f)
        lib.add(species, c, (0.05, 0.05), {"image": str(f), "channel": "Z",
                                          "extent_nm": 0.05 * max(c.shape) / 1.3})
    return lib


@pytest.mark.parametrize("i", [0, 3, 7])
def test_enantiomer_references_switch_mirror_off(tmp_path, labelled_dir, i):
    """`normalise.mirror: auto` on the real F-HPB crops (not a flipped copy): an L and an R
    reference are mirror images of each other, so mirrored poses are off; an L reference with a
    Monoradical reference (or alone) keeps them."""
    cfg = NormaliseConfig()
    assert cfg.mirror == "auto"
    enc = PixelEncoder(64)
    lr = _crop_library(tmp_path / "lr", labelled_dir, [("L", "FHPB/L", i), ("R", "FHPB/R", i)])
    r = lr.pose_embeddings(enc, cfg)
    print("L/R:", r.mirror_reason)
    assert r.mirror is False and r.enantiomers and "L/R" in r.mirror_reason
    assert len(r.emb) == 2 * 36 and not r.mirrored.any()
    mixed = _crop_library(tmp_path / "mixed", labelled_dir, [("L", "FHPB/L", i), ("M", "Monoradical/others", i)])
    rm = mixed.pose_embeddings(enc, cfg)
    print("L/others:", rm.mirror_reason)
    assert rm.mirror is True and len(rm.emb) == 2 * 72
    single = _crop_library(tmp_path / "one", labelled_dir, [("L", "FHPB/L", i)])
    assert single.pose_embeddings(enc, cfg).mirror is True


def test_auto_encoder_never_picks_a_mirror_blind_encoder_for_enantiomers(tmp_path, labelled_dir):
    """`encoder: auto` (pixel vs Zernike without a CLIP model): Zernike moment magnitudes cannot see
    a mirror, so with L/R enantiomers in the library it is not a candidate (measured on the real
    crops: mirror invariance 1.000 for Zernike, ~0.7 for pixels; L-R closest cosine 0.98-0.99 for
    Zernike, 0.82-0.88 for pixels)."""
    from stm_agent.agent.pipeline import Recognizer

    lib = _crop_library(tmp_path, labelled_dir, [("L", "FHPB/L", 1), ("R", "FHPB/R", 1)])
    cfg = AgentConfig()
    cfg.references.folder = lib.folder
    cfg.encoder.name = "auto"
    rec = Recognizer.from_config(cfg)
    print(rec.separation)
    assert list(rec.candidates) == ["pixel"]
    assert rec.separation["zernike"]["separable"] is False and rec.separation["zernike"]["mirror_invariance"] > 0.99
    assert rec.separation["pixel"]["separable"] is True
    # with a library that is not chiral, both stay candidates
    lib2 = _crop_library(tmp_path / "b", labelled_dir, [("A", "Monoradical/chiral", 1), ("B", "Monoradical/others", 1)])
    cfg.references.folder = lib2.folder
    assert list(Recognizer.from_config(cfg).candidates) == ["pixel", "zernike"]


def test_refs_cli_add_show_remove(tmp_path, au111, sxm_dir):
    from typer.testing import CliRunner

    from stm_agent.agent.cli import app

    cfg = AgentConfig()
    _, regions = detect(au111, cfg)
    inner = [r for r in regions if not r.touches_edge]
    folder = tmp_path / "refs"
    scan = str(sxm_dir / "au111_adsorbates_10nm_256_up.sxm")
    run = CliRunner().invoke
    for r in inner[:2]:
        x, y = r.centroid_px
        out = run(app, ["refs", "add", "A", "--scan", scan, "--at", f"{x:.1f},{y:.1f}", "--px", "--refs", str(folder)])
        assert out.exit_code == 0, out.output
        # says which object it took: its position and size
        assert "the object at" in out.output
    assert "added reference 2 of A" in out.output  # appended: two prototypes of A
    again = run(app, ["refs", "add", "B", "--scan", scan, "--at", f"{x:.1f},{y:.1f}", "--px", "--refs", str(folder)])
    text = " ".join(again.output.split())
    assert again.exit_code != 0 and "already reference A/ref_" in text and "Traceback" not in text, again.output
    assert len(ReferenceLibrary(folder).entries()) == 2  # nothing added
    shown = run(app, ["refs", "show", "--refs", str(folder)])
    assert shown.exit_code == 0 and shown.output.count("ref_") == 2 and "mirrored poses: on" in shown.output
    first = ReferenceLibrary(folder).entries()[0].path.stem
    gone = run(app, ["refs", "remove", first, "--refs", str(folder)])
    assert gone.exit_code == 0 and first in gone.output
    assert [e.path.stem for e in ReferenceLibrary(folder).entries()] != [first]
    assert len(ReferenceLibrary(folder).entries()) == 1
    bad = run(app, ["refs", "remove", "A/5", "--refs", str(folder)])
    text = " ".join(bad.output.split())
    assert bad.exit_code != 0 and "no reference 'A/5'" in text and "Traceback" not in text
    assert run(app, ["refs", "remove", "A/1", "--refs", str(folder)]).exit_code == 0
    assert not (folder / "A").exists() or not list((folder / "A").glob("*.npy"))
