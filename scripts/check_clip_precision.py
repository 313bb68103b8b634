"""Does a quantised CLIP export recognise as fp32 does? Cosine to fp32 and recognition F1, same references.

    python scripts/check_clip_precision.py --model-dir OUT [--precision int8] [--seeds 5] [--threshold 0.9]
    python scripts/check_clip_precision.py            # random-weight ViT-B-32 exported to a temp folder

Run this on every real export (``stm-agent models export --pretrained openai --out OUT
--calibrate-sxm SCANS``) before trusting its int8 model: random weights quantise benignly, so the
figures of a random-weight export (docs/encoders.md) cannot prove that real recognition is unchanged.

What it does, with the labelled crop sets ``../shared/data/labelled/crops/{FHPB,Monoradical}``
(never used for the int8 calibration, which comes from .sxm scans):

- cosine between each crop's fp32 and ``--precision`` embedding (normalised crops, as queries);
- recognition only (:func:`agent.evaluation.evaluate`, mode ``recognition``, K = 1 reference per
  class drawn with each seed; the same draws for both precisions): micro/macro F1 at
  ``--threshold`` and at no threshold (arg-max species: random weights squeeze all similarities
  near 1), their difference, and the fraction of objects given the same species.

Exit status 1 when a macro or micro F1 differs by more than ``--tolerance`` (0.01).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="export root (holds fp32 and the variants)")
    ap.add_argument("--precision", default="int8", help="variant compared to fp32 (int8, int8-dynamic, fp16)")
    ap.add_argument("--crops", type=Path, nargs="*",
                    default=[DATA / "labelled" / "crops" / "FHPB", DATA / "labelled" / "crops" / "Monoradical"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--tolerance", type=float, default=0.01)
    a = ap.parse_args(argv)

    from stm_agent.adapters.labelled import load_labelled
    from stm_agent.agent.config import AgentConfig
    from stm_agent.agent.evaluation import EvalSettings, Evaluator, evaluate, metrics, predict
    from stm_agent.models.clip_onnx import ClipOnnxEncoder

    with tempfile.TemporaryDirectory() as td:
        root = a.model_dir
        if root is None:
            from stm_agent.agent.cli_models import calibration_crops
            from stm_agent.models.export import export_clip

            root = Path(td) / "clip"
            calib = np.stack(calibration_crops(DATA / "sxm", per_scan=16, limit=128))
            rep = export_clip("ViT-B-32", None, root, calibration_crops=calib)
            print(f"exported random-weight ViT-B-32 (calibration: {len(calib)} crops from .sxm scans); "
                  f"export check cosine vs fp32 {rep.cosine_vs_fp32}")
        enc32 = ClipOnnxEncoder(root, precision="fp32", cache=False)
        encq = ClipOnnxEncoder(root, precision=a.precision, cache=False)
        print(f"model {enc32.meta.arch} pretrained={enc32.meta.pretrained}; {a.precision} id {encq.id}")
        worst = 0.0
        for folder in a.crops:
            lset = load_labelled(folder)
            results = {}
            for prec in ("fp32", a.precision):
                cfg = AgentConfig()
                cfg.encoder.name = "clip"
                cfg.encoder.model_dir = root
                cfg.encoder.precision = prec
                cfg.match.threshold = a.threshold
                st = EvalSettings(mode="recognition", entries=["clip"], seeds=list(range(a.seeds)),
                                  threshold=a.threshold)
                _, scored = evaluate(lset, cfg, st)
                results[prec] = scored["clip"]
            grey = Evaluator(lset, AgentConfig(), EvalSettings(mode="recognition"))._crops_grey()
            cos = (enc32.embed(grey) * encq.embed(grey)).sum(axis=1)
            print(f"set {lset.name}: {lset.n_objects} crops, classes {lset.classes}")
            print(f"  cosine {a.precision} vs fp32: min {cos.min():.5f}, 1st percentile {np.percentile(cos, 1):.5f}, "
                  f"mean {cos.mean():.5f}")
            for label, thr in ((f"threshold {a.threshold}", a.threshold), ("arg-max (no threshold)", -2.0)):
                row = {}
                for prec, sc in results.items():
                    row[prec] = (np.mean([metrics(s.confusion(thr), s.classes)["micro"]["f1"] for s in sc]),
                                 np.mean([metrics(s.confusion(thr), s.classes)["macro"]["f1"] for s in sc]))
                same = np.mean(np.concatenate([predict(s.scores, s.missed, thr) == predict(q.scores, q.missed, thr)
                                               for s, q in zip(results["fp32"], results[a.precision])]))
                d_mi = row[a.precision][0] - row["fp32"][0]
                d_ma = row[a.precision][1] - row["fp32"][1]
                worst = max(worst, abs(d_mi), abs(d_ma))
                print(f"  {label:<24} micro F1 fp32 {row['fp32'][0]:.4f} {a.precision} {row[a.precision][0]:.4f} "
                      f"({d_mi:+.4f}); macro F1 fp32 {row['fp32'][1]:.4f} {a.precision} {row[a.precision][1]:.4f} "
                      f"({d_ma:+.4f}); same species: {100 * same:.1f} % of objects x {a.seeds} draws")
            # how close to a tie were the objects whose species changed? (fp32 best - second score)
            s32 = np.concatenate([s.scores for s in results["fp32"]])
            sq = np.concatenate([s.scores for s in results[a.precision]])
            top2 = np.sort(s32, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            flip = np.argmax(s32, axis=1) != np.argmax(sq, axis=1)
            print(f"  |score change| median {np.median(np.abs(sq - s32)):.1e}, max {np.abs(sq - s32).max():.1e}; "
                  f"fp32 margin best - 2nd species: median {np.median(margin):.1e}; of the {int(flip.sum())} "
                  f"object-draws whose best species changed: "
                  f"{', '.join(f'{m:.1e}' for m in np.sort(margin[flip])) or '-'}")
    ok = worst <= a.tolerance
    print(f"largest |F1 difference| {worst:.4f}: {'within' if ok else 'BEYOND'} {a.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
