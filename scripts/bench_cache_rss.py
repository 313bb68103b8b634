"""Reference-cache load time (cold / warm) and the peak RSS of a fresh ONNX CLIP process.

    python scripts/bench_cache_rss.py [--species 5] [--repeats 3] [--encoders pixel zernike]
                                      [--model-dir DIR] [--rss-batch 64]

Cache: a library of ``--species`` real objects (one species each) picked with
:func:`agent.pipeline.reference_crop_at` from a real Nanonis scan (Cu(111) + TCNE clusters),
normalised with the default settings (36 rotations x mirror = 72 poses, 64 px). ``cold`` =
:meth:`ReferenceLibrary.pose_embeddings` without a cache (crop, poses, embedding of every pose,
``.npz`` written); ``warm`` = the same call with the cache present (file hashes + ``.npz`` load).
Medians over ``--repeats``.

RSS: a FRESH Python process that imports only onnxruntime and :mod:`models.clip_onnx` (never
torch; checked in the child), loads the ONNX CLIP model of ``--model-dir`` and embeds a batch of
``--rss-batch`` real crops; its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is
reported next to the one of a process that only imports the same modules. Without
``--model-dir`` a ViT-B-32 with random weights is exported to a temporary folder first
(``models.export.export_clip``, ~70 s; speed and memory do not depend on the weight values).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

DATA = REPO / ".." / "shared" / "data"

_CHILD = r"""
import resource, sys, time
import numpy as np, cv2, onnxruntime
from pathlib import Path
from stm_agent.models.clip_onnx import ClipOnnxEncoder
files = sorted(p for p in Path(sys.argv[2]).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
g = [cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (64, 64), interpolation=cv2.INTER_AREA) for f in files]
crops = np.stack([g[i % len(g)] for i in range(int(sys.argv[3]))])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] != "-":
    t = time.perf_counter(); enc = ClipOnnxEncoder(sys.argv[1]); t_load = time.perf_counter() - t
    t = time.perf_counter(); e = enc.embed(crops); t_emb = time.perf_counter() - t
else:
    t_load = t_emb = 0.0
assert "torch" not in sys.modules, "torch was imported"
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
hwm = float(hwm[0].split()[1]) / 1024 if hwm else float("nan")
print(base / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm, t_load, t_emb)
"""


def build_library(folder: Path, n_species: int):
    """``n_species`` real objects of a real scan stored as one-reference species; returns the config."""
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.adapters.sxm import read_sxm
    from stm_agent.agent.config import AgentConfig
    from stm_agent.agent.pipeline import detect, reference_crop_at

    scan = read_sxm(DATA / "sxm" / "cu111_tcne_steps_clusters_50nm_256_down.sxm")
    cfg = AgentConfig()
    cfg.references.folder = folder
    _, regions = detect(scan, cfg)
    inner = sorted((r for r in regions if not r.touches_edge), key=lambda r: -r.area_px)
    if len(inner) < n_species:
        raise SystemExit(f"the scan holds {len(inner)} whole objects, fewer than --species {n_species}")
    lib = ReferenceLibrary(folder)
    for k, r in enumerate(inner[:n_species]):
        crop, ps, prov = reference_crop_at(scan, *r.centroid_px, cfg, units="px")
        lib.add(f"S{k}", crop, ps, prov)
    return cfg, lib


def bench_cache(lib, cfg, encoder, repeats: int) -> tuple[float, float, int]:
    """Median cold and warm :meth:`pose_embeddings` time (ms) and the number of pose rows."""
    cold, warm = [], []
    for _ in range(repeats):
        shutil.rmtree(lib.folder / ".cache", ignore_errors=True)
        t = time.perf_counter()
        refs = lib.pose_embeddings(encoder, cfg.normalise)
        cold.append(time.perf_counter() - t)
        assert lib.last_cache_hit is False
        t = time.perf_counter()
        lib.pose_embeddings(encoder, cfg.normalise)
        warm.append(time.perf_counter() - t)
        assert lib.last_cache_hit is True
    return float(np.median(cold)) * 1e3, float(np.median(warm)) * 1e3, len(refs.emb)


def fresh_rss(model_dir: Path | None, batch: int) -> tuple[float, float, float, float, float]:
    """Run :data:`_CHILD` in a fresh interpreter.

    Returns (ru_maxrss after imports MB, ru_maxrss at the end MB, VmHWM MB, load s, embed s).
    Linux carries the parent's RSS high-water mark over ``fork`` + ``exec`` into the child's
    ``ru_maxrss``, so the parent must still be small when it starts the child (``main`` runs
    this first and exports the model in another child); ``VmHWM`` of ``/proc/self/status``
    (per address space, reset by ``exec``) cross-checks it.
    """
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_dir) if model_dir else "-", str(DATA / "labelled" / "crops"), str(batch)],
        capture_output=True, text=True, cwd=REPO,
    )
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-2000:]}")
    return tuple(float(v) for v in out.stdout.split()[-5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--species", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoders", nargs="+", default=["pixel", "zernike"], choices=["pixel", "zernike", "clip"])
    ap.add_argument("--model-dir", type=Path, default=None, help="ONNX CLIP folder (else a random ViT-B-32 is exported)")
    ap.add_argument("--rss-batch", type=int, default=64)
    ap.add_argument("--no-rss", action="store_true")
    a = ap.parse_args()
    model_dir = a.model_dir
    with tempfile.TemporaryDirectory() as td:
        if not a.no_rss:  # first, while this process is small (see fresh_rss)
            if model_dir is None:
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import sys; from stm_agent.models.export import export_clip; "
                                "export_clip('ViT-B-32', None, sys.argv[1])", td], cwd=REPO, check=True,
                               capture_output=True)
                print(f"exported ViT-B-32 (random weights) in {time.perf_counter() - t:.0f} s")
                model_dir = Path(td)
            _, peak0, hwm0, _, _ = fresh_rss(None, a.rss_batch)
            _, peak, hwm, t_load, t_emb = fresh_rss(model_dir, a.rss_batch)
            print(f"fresh process, onnxruntime + models.clip_onnx imported, no torch: peak RSS {peak0:.0f} MB "
                  f"(VmHWM {hwm0:.0f} MB)")
            print(f"fresh process, ONNX CLIP ViT-B-32 fp32 loaded ({t_load:.2f} s) and {a.rss_batch} crops "
                  f"embedded ({t_emb:.2f} s): peak RSS {peak:.0f} MB (VmHWM {hwm:.0f} MB; "
                  f"+{peak - peak0:.0f} MB for model + batch)")
        from stm_agent.models.registry import make_encoder

        with tempfile.TemporaryDirectory() as tl:
            cfg, lib = build_library(Path(tl) / "refs", a.species)
            print(f"library: {a.species} species x 1 real reference, {cfg.normalise.rotations} rotations"
                  f"{' x mirror' if cfg.normalise.mirror else ''}, {cfg.normalise.size_px} px")
            print(f"{'encoder':<10}{'poses':>7}{'dim':>7}{'cold ms':>10}{'warm ms':>10}{'cache kB':>10}")
            for name in a.encoders:
                if name == "clip" and model_dir is None:
                    raise SystemExit("--encoders clip needs --model-dir (or the RSS part's export)")
                enc = make_encoder(cfg.encoder.model_copy(update={"name": name, "model_dir": model_dir}), cfg.normalise)
                cold, warm, m = bench_cache(lib, cfg, enc, a.repeats)
                kb = sum(p.stat().st_size for p in (lib.folder / ".cache").glob("*.npz")) / 1024
                print(f"{name:<10}{m:>7}{enc.dim:>7}{cold:>10.1f}{warm:>10.1f}{kb:>10.0f}")


if __name__ == "__main__":
    main()
