"""Benchmark the encoders on this machine: crops per second, ratio to torch eager, peak RSS.

    python scripts/bench_encoders.py [--n 64] [--size 64] [--batch 32] [--threads 0] [--repeats 5]
                                     [--precisions fp32 int8 int8-dynamic fp16] [--model-dir DIR]
                                     [--batch-sweep 1 8 16 32 64] [--io-binding]

Encoders: pixel, zernike, clip-onnx at each ``--precisions`` entry and open_clip torch eager with
the same weights (ViT-B-32 with RANDOM weights saved to a temporary checkpoint and exported from
it, unless ``--model-dir`` names an export: speed does not depend on the weight values). Crops are
real STM crops (../shared/data/labelled/crops) resized to ``--size``; the int8 variant is
calibrated on object crops cut from the .sxm scans of ../shared/data/sxm (never the labelled crops).

Fairness (issue 14): every encoder embeds the same crops, preprocessing included, with the same
batch size and thread count (torch: ``torch.set_num_threads`` + ``torch.inference_mode()``;
onnxruntime: intra-op threads, sequential execution, embedding cache off). The repeats are
round-robin (repeat r runs every encoder once, in turn), so a load change on a shared machine hits
all encoders alike; the figures are medians over repeats and the ratio is the median of the
per-repeat ratios to torch eager. Peak RSS: VmHWM of a fresh process per encoder (only
onnxruntime, or only torch + open_clip) loading the model and embedding one batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


def _crops(n: int, size: int) -> np.ndarray:
    files = sorted(p for p in (DATA / "labelled" / "crops").rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not files:
        raise SystemExit("real crops missing: ../shared/data/labelled/crops")
    g = [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA) for f in files]
    return np.stack([g[i % len(g)] for i in range(n)])


def cpu_summary() -> str:
    """CPU model, logical CPUs and the SIMD flags that matter for fp32/int8 inference."""
    model, flags = platform.processor() or "?", set()
    try:
        txt = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", txt)
        model = m.group(1).strip() if m else model
        m = re.search(r"flags\s*:\s*(.+)", txt)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    keep = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    have = [f for f in keep if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(have) or 'none of ' + ' '.join(keep)}"


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _vm_hwm_mb(code: str) -> float:
    """VmHWM (MB) of a fresh Python process running ``code`` (which must print its VmHWM in kB).

    Not ru_maxrss of a child: Linux carries this (big, torch-loaded) parent's ru_maxrss into a child
    across fork + exec; VmHWM belongs to the child's own address space.
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        return float("nan")
    return float(r.stdout.split()[-1]) / 1024


_HWM = "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="crops per repeat")
    ap.add_argument("--size", type=int, default=64, help="crop side, px")
    ap.add_argument("--batch", type=int, default=32, help="batch size of clip-onnx and torch eager")
    ap.add_argument("--threads", type=int, default=0, help="threads of onnxruntime and torch; 0 = physical cores")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precisions", nargs="*", default=["fp32", "int8", "int8-dynamic"])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="an existing export (torch eager gets --checkpoint, else random weights: speed only)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="with --model-dir: the checkpoint it was exported from, loaded into torch eager")
    ap.add_argument("--batch-sweep", type=int, nargs="*", default=[],
                    help="also time the default precision at these batch sizes")
    ap.add_argument("--io-binding", action="store_true", help="also time the default precision with I/O binding")
    a = ap.parse_args()

    from stm_agent.agent.cli_models import calibration_crops
    from stm_agent.models.clip_onnx import CPU_DEFAULT_PRECISION, ClipOnnxEncoder, physical_cores
    from stm_agent.models.export import _torch_embed, build_model, export_clip
    from stm_agent.models.pixel import PixelEncoder
    from stm_agent.models.preprocess import clip_preprocess
    from stm_agent.models.zernike import ZernikeEncoder

    threads = a.threads or physical_cores()
    crops = _crops(a.n, a.size)
    print(f"CPU: {cpu_summary()}")
    print(f"load average at start: {load_avg()}; threads {threads}; batch {a.batch}; {a.n} real crops "
          f"of {a.size}x{a.size} px per repeat; {a.repeats} round-robin repeats")
    import onnxruntime as ort
    import torch

    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}")
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as td:
        if a.model_dir is None:
            model, _, _ = build_model("ViT-B-32", None)
            ckpt = Path(td) / "vitb32_random.pt"
            torch.save(model.state_dict(), ckpt)
            calib = np.stack(calibration_crops(DATA / "sxm", per_scan=16, limit=128))
            t = time.perf_counter()
            rep = export_clip("ViT-B-32", ckpt, Path(td) / "clip", fp16="fp16" in a.precisions,
                              int8=bool({"int8", "int8-dynamic"} & set(a.precisions)), check_crops=crops[:8], calibration_crops=calib)
            print(f"export ({time.perf_counter() - t:.0f} s): fused {rep.fused}, max |onnx - torch| "
                  f"{rep.max_abs_diff_torch:.2e}, cosine vs fp32 {rep.cosine_vs_fp32}")
            model_dir = Path(td) / "clip"
            del model
        else:
            model_dir = a.model_dir
            ckpt = a.checkpoint
        import gc

        gc.collect()

        fns: dict[str, object] = {
            "pixel": PixelEncoder(a.size).embed,
            "zernike": ZernikeEncoder(a.size).embed,
        }
        encs = {}
        for prec in a.precisions:
            try:
                encs[prec] = ClipOnnxEncoder(model_dir, threads=threads, batch_size=a.batch, precision=prec, cache=False)
            except Exception as e:  # a variant the given export lacks
                print(f"clip-onnx-{prec}: not available ({e})")
                continue
            fns[f"clip-onnx-{prec}"] = encs[prec].embed
        for b in a.batch_sweep:
            fns[f"clip-onnx-{CPU_DEFAULT_PRECISION} b{b}"] = ClipOnnxEncoder(
                model_dir, threads=threads, batch_size=b, precision=CPU_DEFAULT_PRECISION, cache=False).embed
        if a.io_binding and CPU_DEFAULT_PRECISION in encs:
            e = encs[CPU_DEFAULT_PRECISION]

            def bound(c, e=e):
                out = []
                for i in range(0, len(c), a.batch):
                    io = e.session.io_binding()
                    io.bind_cpu_input(e._input, e.preprocess(c[i:i + a.batch]))
                    io.bind_output(e._output)
                    e.session.run_with_iobinding(io)
                    out.append(io.copy_outputs_to_cpu()[0])
                return np.concatenate(out)

            fns[f"clip-onnx-{CPU_DEFAULT_PRECISION} iobinding"] = bound
        model, _, _ = build_model("ViT-B-32", ckpt)
        mm = ClipOnnxEncoder(model_dir, precision="fp32", cache=False).meta

        def torch_eager(c):
            return _torch_embed(model, clip_preprocess(c, mm.image_size, mm.mean, mm.std, mm.interpolation), a.batch)

        fns["clip-torch-eager"] = torch_eager
        for f in fns.values():  # warm-up (first-run allocations, lazy initialisation)
            f(crops[:4])
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.repeats):
            for k, f in fns.items():
                c = time.process_time()
                t = time.perf_counter()
                f(crops)
                times[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        load_end = load_avg()

        rss: dict[str, float] = {}
        for prec, e in encs.items():
            rss[f"clip-onnx-{prec}"] = _vm_hwm_mb(
                "import numpy as np; from stm_agent.models.clip_onnx import ClipOnnxEncoder; "
                f"e = ClipOnnxEncoder({str(e.model_dir)!r}, precision='as-is', threads={threads}, "
                f"batch_size={a.batch}, cache=False); e.embed(np.zeros(({a.batch}, {a.size}, {a.size}), np.uint8)); "
                + _HWM)
        rss["clip-torch-eager"] = _vm_hwm_mb(
            f"import torch, numpy as np; torch.set_num_threads({threads}); "
            "from stm_agent.models.export import build_model, _torch_embed; "
            "from stm_agent.models.preprocess import clip_preprocess; "
            f"m, _, _ = build_model('ViT-B-32', {str(ckpt) if ckpt else None!r}); "
            f"_torch_embed(m, clip_preprocess(np.zeros(({a.batch}, {a.size}, {a.size}), np.uint8)), {a.batch}); "
            + _HWM)

    base = np.array(times["clip-torch-eager"])
    print(f"load average at end: {load_end}")
    print(f"{'encoder':<28}{'crops/s':>10}{'min..max':>20}{'x torch eager':>15}{'peak RSS MB':>13}"
          f"{'crops/CPU-s':>13}{'x torch (CPU)':>15}")
    cbase = np.array(cpu["clip-torch-eager"])
    for k, v in times.items():
        v = np.array(v)
        rate = a.n / v
        ratio = np.median(base / v)
        r = f"{rss[k]:13.0f}" if k in rss else f"{'-':>13}"
        cr = a.n / np.median(cpu[k])
        print(f"{k:<28}{np.median(rate):10.1f}{f'{rate.min():.1f}..{rate.max():.1f}':>20}{ratio:15.2f}{r}"
              f"{cr:13.1f}{np.median(cbase / np.array(cpu[k])):15.2f}")
    print("x torch eager = median over repeats of (torch eager time / encoder time) in the same repeat; "
          "peak RSS = VmHWM of a fresh process with only that runtime, model loaded, one batch embedded; "
          "crops/CPU-s and x torch (CPU) = the same from process CPU time (all threads, spin-waits included)")


if __name__ == "__main__":
    main()
