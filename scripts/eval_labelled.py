"""End-to-end evaluation of the recognition pipeline on the labelled real images.

For every image of every COCO set in ``../shared/data/labelled``: one reference per class present
(the segmented object at the centre of the first box of that class, cut with ``reference_crop_at``
as ``stm-agent refs add --at`` does), recognise the frame, match detections to ground truth (IoU >= 0.5 or centroid inside the box)
and print per-class precision / recall / F1. Also prints the segmentation recall (any detection
matched to a box; and the stricter IoU >= 0.5 rate) and the recognition-only accuracy on
``labelled/crops``. Pixel size is unknown for these renders: 1 "nm" per pixel.

Usage: python scripts/eval_labelled.py [--sets sparse fhpb wse2_defects] [--encoder pixel]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.labelled import crop_folders, crops_accuracy, evaluate_set  # noqa: E402
from agent.config import AgentConfig  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "labelled")
    ap.add_argument("--sets", nargs="*", default=["sparse", "fhpb", "wse2_defects"])
    ap.add_argument("--encoder", default="pixel")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    base: dict = {"encoder": {"name": a.encoder}}
    if a.threshold is not None:
        base["match"] = {"threshold": a.threshold}
    print(f"{'set':<14}{'class':<22}{'TP':>5}{'FP':>5}{'FN':>5}{'P':>7}{'R':>7}{'F1':>7}")
    for name in a.sets:
        folder = (a.data / name).resolve()
        if not a.quiet:
            print(f"[{name}]")
        tally, seg = evaluate_set(folder, base, verbose=not a.quiet)
        for c, t in tally.items():
            p, r, f = t.prf()
            print(f"{name:<14}{c:<22}{t.tp:>5}{t.fp:>5}{t.fn:>5}{p:>7.2f}{r:>7.2f}{f:>7.2f}")
        print(f"{name:<14}segmentation: {seg['matched']}/{seg['gt']} boxes matched "
              f"({seg['matched'] / max(seg['gt'], 1):.2f}), IoU>=0.5 {seg['iou50'] / max(seg['gt'], 1):.2f}, "
              f"{seg['detections']} objects, {seg['seconds']:.1f} s recognise")
    crops = (a.data / "crops").resolve()
    if crops.is_dir():
        enc_cfg = AgentConfig()
        from models.registry import make_encoder

        for group in sorted(p for p in crops.iterdir() if p.is_dir()):
            norm = enc_cfg.normalise.model_copy(update={"mirror": group.name != "FHPB"})
            enc = make_encoder(enc_cfg.encoder.model_copy(update={"name": a.encoder}), norm)
            conf = crops_accuracy(crop_folders(group), norm, enc)
            right = sum(conf[c][c] for c in conf)
            n = sum(sum(v.values()) for v in conf.values())
            print(f"crops/{group.name:<13}accuracy {right}/{n} = {right / max(n, 1):.2f} (mirror={norm.mirror}) {conf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
