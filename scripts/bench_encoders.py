"""Benchmark the encoders on this machine: crops per second and peak RSS.

    python scripts/bench_encoders.py [--n 128] [--size 64] [--threads 0]

Encoders: pixel (models/pixel.py), zernike, clip-onnx fp32/fp16/int8 (ViT-B-32 with RANDOM weights
exported to a temporary folder: speed does not depend on the weight values) and open_clip torch
eager with the same weights. Crops are real STM crops (../shared/data/labelled/crops) resized to
``--size``. Prints one line per encoder and the ratios to the torch eager baseline.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _crops(n: int, size: int) -> np.ndarray:
    files = sorted(p for p in (REPO / ".." / "shared" / "data" / "labelled" / "crops").rglob("*")
                   if p.suffix.lower() in (".jpg", ".png"))
    if not files:
        raise SystemExit("real crops missing: ../shared/data/labelled/crops")
    g = [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA) for f in files]
    return np.stack([g[i % len(g)] for i in range(n)])


def _rate(fn, crops: np.ndarray, repeat: int = 2) -> float:
    fn(crops[:4])  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(crops)
        best = min(best, time.perf_counter() - t)
    return len(crops) / best


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    crops = _crops(a.n, a.size)
    rates: dict[str, float] = {}
    try:
        from stm_agent.models.pixel import PixelEncoder
        rates["pixel"] = _rate(PixelEncoder(a.size).embed, crops, 5)
    except ImportError:
        print("pixel: models/pixel.py not available")
    from stm_agent.models.zernike import ZernikeEncoder
    rates["zernike"] = _rate(ZernikeEncoder(a.size).embed, crops, 3)
    rss0 = _rss_mb()
    from stm_agent.models.clip_onnx import ClipOnnxEncoder
    from stm_agent.models.export import export_clip, build_model, _torch_embed
    from stm_agent.models.preprocess import clip_preprocess
    with tempfile.TemporaryDirectory() as td:
        rep = export_clip("ViT-B-32", None, td, fp16=True, int8=True, check_crops=crops[:8])
        print("export check:", {k: v for k, v in rep.to_json().items() if k not in ("model_dirs", "ids")})
        rss_clip = {}
        for prec, d in rep.model_dirs.items():
            enc = ClipOnnxEncoder(d, threads=a.threads)
            rates[f"clip-onnx-{prec}"] = _rate(enc.embed, crops)
            rss_clip[prec] = _rss_mb()
            del enc
        import subprocess
        import sys
        code = ("import resource, numpy as np; from models.clip_onnx import ClipOnnxEncoder; "
                f"e = ClipOnnxEncoder({str(rep.model_dirs['fp32'])!r}); "
                f"e.embed(np.zeros((64, {a.size}, {a.size}), np.uint8)); "
                "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
        # VmHWM, not ru_maxrss: Linux carries this (big, torch-loaded) parent's ru_maxrss into the
        # child across fork + exec; VmHWM belongs to the child's own address space.
        # scripts/bench_cache_rss.py measures both from a small parent.
        fresh = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     cwd=REPO).stdout.split()[-1]) / 1024
        print(f"peak RSS (VmHWM) of a fresh process (onnxruntime only) with ViT-B-32 fp32 loaded, 64 crops embedded: {fresh:.0f} MB")
        import torch
        if a.threads:
            torch.set_num_threads(a.threads)
        model, _, _ = build_model("ViT-B-32", None)
        rates["clip-torch-eager"] = _rate(lambda c: _torch_embed(model, clip_preprocess(c)), crops)
    base = rates["clip-torch-eager"]
    print(f"crops: {a.n} x {a.size}x{a.size} px (real STM crops), cores: {__import__('os').cpu_count()}")
    for k, v in rates.items():
        print(f"{k:18s} {v:10.1f} crops/s   x{v / base:8.2f} vs torch eager")
    print(f"peak RSS: {rss0:.0f} MB before CLIP; after loading/running clip-onnx: "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in rss_clip.items())
          + f"; after torch eager: {_rss_mb():.0f} MB (ru_maxrss is a high-water mark, export included)")


if __name__ == "__main__":
    main()
