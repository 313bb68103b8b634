"""Physical descriptors on the real WSe2 defect images (classes: size x brightness x peak/trough)."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stm_agent.agent.descriptors import MedianMadScaler, combine, describe_objects


@pytest.fixture(scope="module")
def wse2(labelled_dir):
    d = labelled_dir / "wse2_defects"
    ann = json.loads((d / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    names, rows = [], []
    for im in ann["images"]:
        boxes = [a for a in ann["annotations"] if a["image_id"] == im["id"]]
        if not boxes:
            continue
        size_nm = float(re.search(r"_(\d+)[xX](\d+)_", im["file_name"]).group(1))  # scan size in the name
        g = cv2.imread(str(d / im["file_name"]), cv2.IMREAD_GRAYSCALE).astype(np.float64)
        px = size_nm / im["width"]
        desc = describe_objects(g, np.array([a["bbox"] for a in boxes]), (px, px), z_unit=None)
        assert desc.height_unit == "sigma"
        names += [cats[a["category_id"]] for a in boxes]
        rows.append(np.column_stack([desc.area_nm2, desc.feret_nm, desc.height, desc.contrast_sign]))
    return np.array(names), np.concatenate(rows)


def test_descriptors_separate_wse2_classes(wse2):
    """Measured: AUC Large/Small by area 0.95, Bright/Dim by |height| 0.64, sign = Peak/Trough 95 %."""
    names, x = wse2
    assert len(names) == 725
    large = np.char.startswith(names, "Large")
    bright = np.char.find(names, "Bright") >= 0
    peak = np.char.endswith(names, "Peak")
    assert np.all(x[:, 0] > 0) and np.all(x[:, 1] > 0)
    assert roc_auc_score(large, x[:, 0]) > 0.85
    assert roc_auc_score(large, x[:, 1]) > 0.85
    assert roc_auc_score(bright, np.abs(x[:, 2])) > 0.57
    acc = np.mean((x[:, 3] > 0) == peak)
    assert acc > 0.85 and acc > max(peak.mean(), 1 - peak.mean()) + 0.3
    assert np.all(np.sign(x[:, 2]) == x[:, 3])  # signed height agrees with the contrast sign


def test_units_pm_and_given_mask():
    img = np.zeros((40, 40))
    img[15:25, 15:25] = 2e-10  # a 10x10 px, 200 pm high plateau
    d = describe_objects(img, np.array([[12, 12, 16, 16]]), (0.1, 0.1), masks=None, z_unit="m")
    assert d.height_unit == "pm" and d.height[0] == pytest.approx(200.0)
    assert d.area_nm2[0] == pytest.approx(1.0) and d.contrast_sign[0] == 1
    m = np.zeros((16, 16), bool)
    m[3:13, 3:13] = True
    d2 = describe_objects(-img, np.array([[12, 12, 16, 16]]), (0.1, 0.1), masks=[m])
    assert d2.contrast_sign[0] == -1 and d2.height[0] == pytest.approx(-200.0)
    with pytest.raises(ValueError):
        describe_objects(img, np.array([[100, 100, 5, 5]]), (0.1, 0.1))


def test_combination_weights_cosine(wse2):
    _, x = wse2
    rng = np.random.default_rng(1)
    e = rng.normal(size=(6, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    feats = np.column_stack([np.log(x[:6, 0]), np.log(x[:6, 1]), np.abs(x[:6, 2]), x[:6, 3]])
    d = MedianMadScaler().fit(np.column_stack([np.log(x[:, 0]), np.log(x[:, 1]), np.abs(x[:, 2]), x[:, 3]])).transform(feats)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    z = combine(e, d, 0.3)
    assert z.shape == (6, 12) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert np.allclose(z @ z.T, 0.7 * (e @ e.T) + 0.3 * (dn @ dn.T), atol=1e-5)
    with pytest.raises(ValueError):
        combine(e, d, 1.5)
