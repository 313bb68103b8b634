"""Zernike baseline (counting-molecules) on real crops, checked against mahotas."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stm_agent.models.zernike import ZernikeEncoder, median_bbox_diagonal, zernike_indices, zernike_moments


@pytest.fixture(scope="module")
def crops64(labelled_dir) -> dict[str, np.ndarray]:
    out = {}
    for sub in ("FHPB/L", "Monoradical/chiral"):
        files = sorted((labelled_dir / "crops" / sub).iterdir())
        assert files, sub
        out[sub] = np.stack([cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (64, 64),
                                        interpolation=cv2.INTER_AREA) for f in files])
    return out


def test_matches_mahotas(crops64):
    mahotas = pytest.importorskip("mahotas", reason='needs the export extra: pip install -e ".[test,export]"')
    ims = crops64["FHPB/L"][:8].astype(np.float64)
    ims -= np.median(ims.reshape(len(ims), -1), axis=1)[:, None, None]
    ours = zernike_moments(ims, 30.0, 8)
    ref = np.stack([mahotas.features.zernike_moments(np.clip(im, 0, None), 30.0, degree=8, cm=(31.5, 31.5))
                    for im in ims])
    assert ours.shape == (8, 25) == (8, len(zernike_indices(8)))
    assert np.abs(ours - ref).max() < 1e-10


def test_rotation_and_mirror_invariance(crops64):
    enc = ZernikeEncoder(64)
    c = crops64["Monoradical/chiral"][:5]
    rot = np.stack([np.rot90(x) for x in c])
    mir = c[:, :, ::-1]
    e, er, em = enc.embed(c), enc.embed(rot), enc.embed(mir)
    assert e.shape == (5, 27) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(e * er, axis=1)) > 0.999  # exact 90 degree rotation
    assert np.min(np.sum(e * em, axis=1)) > 0.999  # mirror: Zernike magnitudes cannot tell L from R


def test_species_separate_better_than_chance(crops64):
    """Nearest-other-crop (leave-one-out) species accuracy on two real species beats chance."""
    enc = ZernikeEncoder(64)
    x = np.concatenate([crops64["FHPB/L"], crops64["Monoradical/chiral"]])
    y = np.array([0] * len(crops64["FHPB/L"]) + [1] * len(crops64["Monoradical/chiral"]))
    f = enc.features(x)
    f = (f - f.mean(0)) / np.maximum(f.std(0), 1e-12)
    d = np.linalg.norm(f[:, None] - f[None], axis=2)
    np.fill_diagonal(d, np.inf)
    acc = float(np.mean(y[d.argmin(1)] == y))
    assert acc > 0.8, acc


def test_id_radius_and_errors():
    assert ZernikeEncoder(64).id == "zernike/v1/deg8/r32.00/size64"
    r = median_bbox_diagonal(np.array([[0, 0, 3, 4], [0, 0, 6, 8], [1, 1, 30, 40]]))
    assert r == 10.0
    assert ZernikeEncoder(64, radius_px=r).id == "zernike/v1/deg8/r10.00/size64"
    with pytest.raises(ValueError):
        ZernikeEncoder(64).embed(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError):
        median_bbox_diagonal(np.zeros((0, 4)))
    assert np.all(ZernikeEncoder(64).features(np.full((1, 64, 64), 120, np.uint8)) == 0)
