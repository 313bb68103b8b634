"""COCO, labelme and Pascal VOC readers give identical boxes (real annotations converted in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stm_agent.adapters.labelled import load_coco, load_labelled, load_labelme, load_voc, match_boxes
from stm_agent.agent.errors import ImageFormatError


def _write_labelme(images, folder: Path) -> None:
    for im in images:
        shapes = [{"label": lab, "points": [[x, y], [x + w, y + h]], "shape_type": "rectangle", "group_id": None,
                   "flags": {}} for lab, (x, y, w, h) in zip(im.labels, im.boxes.tolist())]
        doc = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": str(im.path), "imageData": None,
               "imageHeight": im.height, "imageWidth": im.width}
        (folder / f"{im.path.stem}.json").write_text(json.dumps(doc), encoding="utf-8")


def _write_voc(images, folder: Path) -> None:
    for im in images:
        objs = "".join(
            f"<object><name>{lab}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{x + 1:g}</xmin><ymin>{y + 1:g}</ymin><xmax>{x + w:g}</xmax><ymax>{y + h:g}</ymax></bndbox></object>"
            for lab, (x, y, w, h) in zip(im.labels, im.boxes.tolist()))
        xml = (f"<annotation><folder>x</folder><filename>{im.path}</filename><size><width>{im.width}</width>"
               f"<height>{im.height}</height><depth>3</depth></size>{objs}</annotation>")
        (folder / f"{im.path.stem}.xml").write_text(xml, encoding="utf-8")


@pytest.mark.parametrize("name", ["fhpb", "sparse", "wse2_defects"])
def test_three_formats_identical(labelled_dir, tmp_path, name):
    coco, classes = load_coco(labelled_dir / name)
    coco = coco[:5]
    (tmp_path / "lm").mkdir()
    (tmp_path / "voc").mkdir()
    _write_labelme(coco, tmp_path / "lm")
    _write_voc(coco, tmp_path / "voc")
    lm, lm_cl = load_labelme(tmp_path / "lm")
    voc, voc_cl = load_voc(tmp_path / "voc")
    assert len(lm) == len(voc) == len(coco)
    for a, b, c in zip(coco, lm, voc):
        assert a.path == b.path == c.path
        assert (a.width, a.height) == (b.width, b.height) == (c.width, c.height)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.boxes, c.boxes)
        assert a.labels == b.labels == c.labels
    assert set(lm_cl) == set(voc_cl) == {lab for im in coco for lab in im.labels}
    # format detection, folders and single files
    assert load_labelled(labelled_dir / name).format == "coco"
    assert load_labelled(labelled_dir / name / "annotations.json").format == "coco"
    assert load_labelled(tmp_path / "lm").format == "labelme"
    assert load_labelled(tmp_path / "voc").format == "voc"
    one = load_labelled(next((tmp_path / "voc").glob("*.xml")))
    assert one.format == "voc" and len(one.images) == 1
    # ann ids: COCO ids kept; labelme/VOC numbered 1.. over the set
    assert coco[0].ann_ids and lm[0].ann_ids[0] == 1


def test_crops_detected(labelled_dir):
    s = load_labelled(labelled_dir / "crops" / "FHPB")
    assert s.format == "crops" and s.classes == ["L", "R"] and s.n_objects == 46


def test_bad_files_name_file_and_reason(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"shapes": [{"label": "A"}], "imagePath": "x.png"}', encoding="utf-8")
    with pytest.raises(ImageFormatError, match="bad.json.*labelme"):
        load_labelled(bad_json)
    bad_xml = tmp_path / "bad.xml"
    bad_xml.write_text("<annotation><object><name>A</name></object>", encoding="utf-8")
    with pytest.raises(ImageFormatError, match="bad.xml.*VOC"):
        load_labelled(bad_xml)
    other = tmp_path / "o.json"
    other.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ImageFormatError, match="neither COCO"):
        load_labelled(other)
    with pytest.raises(ImageFormatError, match="not found"):
        load_labelled(tmp_path / "nope")
    bad_coco = tmp_path / "c"
    bad_coco.mkdir()
    (bad_coco / "annotations.json").write_text('{"images": []}', encoding="utf-8")
    with pytest.raises(ImageFormatError, match="annotations.json.*COCO"):
        load_labelled(bad_coco)


def test_match_boxes_iou_configurable():
    gt = np.array([[0, 0, 10, 10]], float)
    det = np.array([[3, 0, 10, 10]], float)          # IoU 70/130 = 0.54
    far = np.array([[20.0, 20.0]])                    # centroid outside the box
    assert match_boxes(det, far, gt)[0] == 0
    assert match_boxes(det, far, gt, iou_min=0.6)[0] == -1
    assert match_boxes(det, np.array([[5.0, 5.0]]), gt, iou_min=0.9)[0] == 0  # centroid inside still matches
