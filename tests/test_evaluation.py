"""agent.evaluation on the real labelled data: metrics, sweep, seeds, references, variants, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from stm_agent.adapters.labelled import load_labelled
from stm_agent.agent.config import load_config
from stm_agent.agent.evaluation import (EvalSettings, Evaluator, confusion_matrix, count_errors, evaluate, flatness,
                                        metrics, predict, sweep)


def test_micro_macro_from_confusion():
    # rows: A, B, (no object); cols: A, B, other, missed
    c = np.array([[8, 1, 1, 0],
                  [2, 4, 0, 2],
                  [3, 0, 9, 0]])
    m = metrics(c, ["A", "B"])
    # A: TP 8, FP 2 + 3, FN 2; B: TP 4, FP 1, FN 4
    assert m["per_class"]["A"] == pytest.approx({"precision": 8 / 13, "recall": 0.8, "f1": 2 * 8 / (2 * 8 + 5 + 2),
                                                 "support": 10, "tp": 8, "fp": 5, "fn": 2})
    assert m["per_class"]["B"]["precision"] == pytest.approx(0.8) and m["per_class"]["B"]["recall"] == 0.5
    assert m["micro"]["precision"] == pytest.approx(12 / 18) and m["micro"]["recall"] == pytest.approx(12 / 18)
    assert m["macro"]["recall"] == pytest.approx((0.8 + 0.5) / 2)
    assert m["macro"]["f1"] == pytest.approx((m["per_class"]["A"]["f1"] + m["per_class"]["B"]["f1"]) / 2)
    # a class without support is left out of the macro mean
    c0 = np.array([[5, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    m0 = metrics(c0, ["A", "B"])
    assert m0["n_classes_macro"] == 1 and m0["macro"]["f1"] == 1.0 and m0["micro"]["precision"] == pytest.approx(5 / 6)


def test_predict_and_confusion():
    s = np.array([[0.95, 0.2], [0.3, 0.6], [0.99, 0.1], [-1, -1]], np.float32)
    missed = np.array([False, False, False, True])
    p = predict(s, missed, 0.9)
    assert p.tolist() == [0, 2, 0, 3]
    c = confusion_matrix(np.array([0, 1, -1, 1]), p, 2)
    assert c.tolist() == [[1, 0, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]
    # argmax (no threshold); the distance-ratio test rejects the ambiguous object only:
    # (1 - 0.62) = 0.38 > 0.9 x (1 - 0.6) = 0.36
    s2 = np.array([[0.95, 0.2], [0.62, 0.6], [-1, -1]], np.float32)
    m2 = np.zeros(3, bool)
    assert predict(s2, m2, -np.inf).tolist() == [0, 0, 2]   # no reference at all: other
    assert predict(s2, m2, -np.inf, ratio=0.9).tolist() == [0, 2, 2]
    assert predict(s2, m2, np.array([0.96, 0.5, 0.5])).tolist() == [2, 0, 2]  # per-object thresholds


@pytest.fixture(scope="module")
def sparse_rec(labelled_dir):
    lset = load_labelled(labelled_dir / "sparse")
    return Evaluator(lset, load_config(), EvalSettings(mode="recognition", entries=["pixel"], seeds=[0]))


def test_sweep_best_equals_direct_evaluation(sparse_rec, labelled_dir):
    for seed in (0, 3):
        sc = sparse_rec.score("pixel", seed)
        sw = sweep(sc.true, sc.scores, sc.missed)
        fl = flatness(sw["thresholds"], sw["micro_f1"])
        direct = metrics(sc.confusion(fl["best_threshold"]), sc.classes)
        assert direct["micro"]["f1"] == pytest.approx(fl["best_f1"], abs=1e-9)
        assert sw["thresholds"][0] == 0.0 and sw["thresholds"][-1] == 1.0  # the sweep covers 0..1
        for t in (0.0, 0.3, 0.5, 0.77, 0.9, 0.99):  # the whole curve, not only the best point
            i = int(np.argmin(np.abs(sw["thresholds"] - t)))
            d = metrics(sc.confusion(sw["thresholds"][i]), sc.classes)
            assert d["micro"]["f1"] == pytest.approx(sw["micro_f1"][i]) and d["macro"]["f1"] == pytest.approx(sw["macro_f1"][i])
        assert fl["plateau"][0] <= fl["best_threshold"] <= fl["plateau"][1]
    # end-to-end too (missed objects and no-object detections in play)
    ev = Evaluator(load_labelled(labelled_dir / "fhpb"), load_config(), EvalSettings(entries=["pixel"]))
    sc = ev.score("pixel", 1)
    assert sc.missed.any() or (sc.true < 0).any()
    sw = sweep(sc.true, sc.scores, sc.missed)
    i = int(np.argmax(sw["micro_f1"]))
    assert metrics(sc.confusion(sw["thresholds"][i]), sc.classes)["micro"]["f1"] == pytest.approx(sw["micro_f1"][i])


def test_seeds_reproducible_and_references_never_scored(sparse_rec, labelled_dir):
    a, b = sparse_rec.score("pixel", 5), sparse_rec.score("pixel", 5)
    assert a.references == b.references
    np.testing.assert_array_equal(a.scores, b.scores)
    refs = {sparse_rec.score("pixel", s).references[0]["ann_id"] for s in range(6)}
    assert len(refs) > 1  # different seeds draw different examples
    scored_ids = {o["ann_id"] for o in a.objects}
    assert a.references[0]["ann_id"] not in scored_ids
    assert len(a.objects) == sum(len(im.labels) for im in sparse_rec.images) - 1
    # end-to-end: neither the reference box nor a detection matched to it is scored
    ev = Evaluator(load_labelled(labelled_dir / "fhpb"), load_config(), EvalSettings(entries=["pixel"], k=2))
    sc = ev.score("pixel", 2)
    ref_ids = {r["ann_id"] for r in sc.references}
    assert len(ref_ids) == 4 and not ref_ids & {o["ann_id"] for o in sc.objects}
    # explicit annotation ids
    ev2 = Evaluator(sparse_rec.lset, load_config(), EvalSettings(mode="recognition", reference_ids=[5]))
    assert ev2.score("pixel", 0).references[0]["ann_id"] == 5


def test_fhpb_crops_mirror_auto_turns_mirror_off(labelled_dir):
    """F-HPB L/R are enantiomers: `normalise.mirror: auto` (the default) turns mirrored poses off in
    every draw (real L and R crops, agent.references.mirror_decision), so it scores as mirror=false."""
    lset = load_labelled(labelled_dir / "crops" / "FHPB")
    acc = {}
    for mirror in ("auto", True, False):
        ev = Evaluator(lset, load_config(overrides={"normalise": {"mirror": mirror}}),
                       EvalSettings(mode="recognition", entries=["pixel"]))
        scs = [ev.score("pixel", s) for s in range(10)]
        if mirror == "auto":
            assert all(sc.info["mirror"]["used"] is False for sc in scs)
        # accuracy = micro recall at argmax (every crop holds one object), 10 draws
        acc[mirror] = np.mean([metrics(sc.confusion(-np.inf), ev.classes)["micro"]["recall"] for sc in scs])
    print("crops/FHPB accuracy mirror auto %.3f, on %.3f, off %.3f" % (acc["auto"], acc[True], acc[False]))
    assert acc["auto"] == pytest.approx(acc[False])


def test_unimr_as_released_differs_as_documented(labelled_dir):
    lset = load_labelled(labelled_dir / "sparse")
    ev = Evaluator(lset, load_config(), EvalSettings(mode="end-to-end", entries=["pixel", "unimr-as-released"],
                                                     max_images=2))
    ours, rel = ev.score("pixel", 0), ev.score("unimr-as-released", 0)
    assert ours.references == rel.references                       # same draw, at labelled boxes
    assert "encoder_chosen" in rel.info                            # pooled-max GMM selection
    assert np.all(rel.thr == 0.9) and rel.ratio == 1.0             # UniMR's fixed threshold, no ratio test
    # the released segmentation (Otsu, THRESH_BINARY_INV, RETR_TREE, mean +- 2 sd), not ours
    for i in range(2):
        ours_boxes, rel_boxes = ev.detections(i)[1], ev.detections(i, released=True)[1]
        assert len(rel_boxes) and not np.array_equal(ours_boxes, rel_boxes)
    refs = ev.draw_references(0)
    r_ours = ev.references_at_boxes(refs)
    r_rel = ev._released_refs("pixel", refs, [r.species for r in r_ours])
    assert not r_rel.mirrored.any() and len(r_rel.emb) == 36       # no mirror poses
    assert not np.allclose(ours.scores[~ours.missed].max(), rel.scores[~rel.missed].max())


def test_draw_without_usable_reference_is_reported(labelled_dir, tmp_path):
    """A class whose every box touches the image border has no usable reference: the draw is
    scored and says so (issue 10, item 6), it does not crash."""
    src = labelled_dir / "sparse" / "annotations.json"
    d = json.loads(src.read_text())
    im0 = d["images"][0]
    d["images"] = [im0]
    d["categories"].append({"id": 99, "name": "cut"})
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] == im0["id"]]
    d["annotations"].append({"id": 9999, "image_id": im0["id"], "category_id": 99, "bbox": [0, 0, 20, 20],
                             "area": 400, "iscrowd": 0})
    for name in ("annotations.json",):
        (tmp_path / name).write_text(json.dumps(d))
    (tmp_path / im0["file_name"]).symlink_to((labelled_dir / "sparse" / im0["file_name"]).resolve())
    for mode in ("end-to-end", "recognition"):
        ev = Evaluator(load_labelled(tmp_path), load_config(), EvalSettings(mode=mode, entries=["pixel"]))
        sc = ev.score("pixel", 0)
        assert sc.info["no_reference"] == ["cut"]
        assert (sc.scores[:, ev.classes.index("cut")] == -1).all()
    rep, _ = evaluate(load_labelled(tmp_path), load_config(), EvalSettings(entries=["pixel"]))
    assert rep["results"]["pixel"]["summary"]["no_reference_draws"] == 1


def test_cli_outputs(labelled_dir, tmp_path):
    from stm_agent.agent.cli_evaluate import evaluate as cmd

    app = typer.Typer()
    app.command()(cmd)
    app.callback()(lambda: None)
    r = CliRunner().invoke(app, ["evaluate", str(labelled_dir / "sparse"), "--compare", "pixel,auto", "--seeds", "2",
                                 "--max-images", "2", "--out", str(tmp_path), "--csv", "--threshold", "0.95"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "sparse.json").read_text())
    assert rep["settings"]["threshold"] == 0.95 and rep["settings"]["seeds"] == [0, 1]
    assert rep["config"]["match"]["threshold"] == "auto" and rep["mode"] == "end-to-end"
    assert set(rep["results"]) == {"pixel", "auto"}
    s = rep["results"]["auto"]["summary"]
    assert sum(s["encoder_chosen"].values()) == 4  # 2 frames x 2 draws
    assert 0 <= s["detection_recall"]["mean"] <= 1 and 0 <= s["detection_precision"]["mean"] <= 1
    assert len(s["sweep_mean"]["micro_f1"]) == 101 and "argmax" in s
    assert set(s["count_error"]) == {"M", "other", "total"}
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size < 200_000 for p in pngs)
    lines = (tmp_path / "sparse_objects.csv").read_text().splitlines()
    assert lines[0].startswith("set,entry,seed,image,ann_id") and len(lines) > 10
    bad = CliRunner().invoke(app, ["evaluate", str(labelled_dir / "sparse"), "--compare", "clip", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "model-dir" in bad.output


def test_evaluate_report_has_everything(labelled_dir):
    rep, scored = evaluate(load_labelled(labelled_dir / "crops" / "Monoradical"), load_config(),
                           EvalSettings(entries=["pixel", "zernike"], seeds=[0, 1, 2]))
    assert rep["mode"] == "recognition"  # crops sets are recognition-only
    for e in ("pixel", "zernike"):
        s = rep["results"][e]["summary"]
        conf = np.array(s["confusion_summed"])
        assert conf.shape == (3, 4) and conf[:, 3].sum() == 0  # no 'missed' in recognition-only
        assert s["n_draws"] == 3 and s["micro"]["f1"]["std"] >= 0
        per = rep["results"][e]["seeds"]
        assert [p["seed"] for p in per] == [0, 1, 2]
        assert s["micro"]["f1"]["mean"] == pytest.approx(np.mean([p["micro"]["f1"] for p in per]))


def test_explicit_reference_library_matches_drawn_reference(sparse_rec, tmp_path):
    """A `stm-agent refs` library given with --references is used as the references: a library made
    from the object of annotation 5 scores the set like drawing annotation 5 (same species order,
    the library's crop stands in for the drawn one), and that box is not scored as a query."""
    from stm_agent.adapters.labelled import image_scan
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.agent.pipeline import reference_crop_at

    lset, cfg = sparse_rec.lset, load_config()
    im = next(im for im in lset.images if 5 in list(im.ann_ids))
    j = list(im.ann_ids).index(5)
    x, y, w, h = im.boxes[j]
    scan = image_scan(im.path)
    crop, px, prov = reference_crop_at(scan, x + w / 2, y + h / 2, cfg, units="px")
    ReferenceLibrary(tmp_path / "refs").add(im.labels[j], crop, px, prov)
    lib = Evaluator(lset, cfg, EvalSettings(mode="recognition", references=tmp_path / "refs")).score("pixel", 0)
    drawn = Evaluator(lset, cfg, EvalSettings(mode="recognition", reference_ids=[5])).score("pixel", 0)
    assert lib.classes == drawn.classes
    # the library's provenance (image, position) identifies the box it came from: not scored
    assert [o["ann_id"] for o in lib.objects] == [o["ann_id"] for o in drawn.objects]
    assert 5 not in {o["ann_id"] for o in lib.objects}
    scored = lib.scores.max(axis=1)
    print(f"library reference: {len(lib.objects)} objects, median best similarity {np.median(scored):.3f}")
    # one M reference of a monospecies set: most M crops match it well whichever way it was given
    assert np.mean(scored >= 0.8) > 0.5
    assert abs(np.mean(lib.scores.max(axis=1)) - np.mean(drawn.scores.max(axis=1))) < 0.1


def test_count_errors_per_frame():
    from stm_agent.agent.evaluation import Scored

    # frame 0: two A (one found as A, one missed), one detection of no object counted as other;
    # frame 1: one B predicted A
    sc = Scored(["A", "B"], true=np.array([0, 0, -1, 1]), scores=np.zeros((4, 2), np.float32),
                missed=np.array([False, True, False, False]), objects=[{}] * 4, references=[],
                group=np.array([0, 0, 0, 1]))
    pred = np.array([0, 3, 2, 0])
    e = count_errors(sc, pred)
    # frame 0: A |1 - 2| = 1, B 0, other 1; frame 1: A |1 - 0| = 1, B |0 - 1| = 1, other 0
    assert e == {"A": 1.0, "B": 0.5, "other": 0.5, "total": 2.0, "n_frames": 2}


def test_end_to_end_references_at_labelled_boxes_and_iou_only(labelled_dir):
    """End to end, drawn references are cut at their labelled boxes (a reference-guided detector can
    be evaluated) and a detection finds a box only with IoU >= 0.5 (a lobe inside it does not)."""
    from stm_agent.adapters.labelled import box_iou

    ev = Evaluator(load_labelled(labelled_dir / "fhpb"), load_config(), EvalSettings(entries=["pixel"]))
    objs = ev.draw_references(0)
    refs = ev.references_at_boxes(objs)
    for (i, j), r in zip(objs, refs):
        box = ev.images[i].boxes[j]
        assert r.extent_nm == pytest.approx(max(box[2], box[3]) * ev.pixel_size(i))
    sc = ev.score("pixel", 0)
    for i in range(len(ev.images)):
        _, db, _, _, m, _ = ev.detections(i)
        hit = m >= 0
        if hit.any():
            iou = box_iou(db[hit], ev.images[i].boxes)[np.arange(hit.sum()), m[hit]]
            assert (iou >= 0.5).all()
    print("fhpb end to end (today's detection):", {k: sc.info[k] for k in ("detection_recall", "detection_precision")})


def test_leave_one_class_out_is_reported(labelled_dir):
    rep, _ = evaluate(load_labelled(labelled_dir / "crops" / "FHPB"), load_config(),
                      EvalSettings(entries=["pixel"], seeds=[0, 1]))
    lo = rep["loco"]["pixel"]
    assert set(lo) == {"L", "R"}
    for v in lo.values():
        assert 0 <= v["other_share"]["mean"] <= 1
        assert 0 <= v["remaining_macro_f1"]["mean"] <= 1 and 0 <= v["remaining_macro_f1_argmax"]["mean"] <= 1
    print("crops/FHPB leave one class out:", {c: round(v["other_share"]["mean"], 2) for c, v in lo.items()})
    # one class only: nothing to leave out
    rep1, _ = evaluate(load_labelled(labelled_dir / "sparse"), load_config(),
                       EvalSettings(mode="recognition", entries=["pixel"], seeds=[0]))
    assert rep1["loco"] == {}
