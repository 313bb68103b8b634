"""Whole-frame benchmark: parse -> flatten -> segment -> normalise -> encode -> match -> publish.

    python scripts/bench_frame.py [--sizes 256 512 1024] [--objects 50 200 600] [--repeats 3]
                                  [--encoder pixel|zernike|clip] [--model-dir DIR] [--precision auto]
                                  [--real au111_adsorbates_10nm_256_up.sxm ...] [--no-baseline]

Frames:

- real Nanonis scans (``--real``, from ``../shared/data/sxm``); references: the (up to) two largest
  whole objects of the scan, one species each;
- synthetic ``.sxm`` files written to a temporary folder (so that parsing is measured too), one per
  ``--sizes`` entry with the matching ``--objects`` count, 0.1 nm pixels: a rough background (tilted
  plane + white noise 5 pm + two 40 pm steps) and N molecules of three species (round Gaussian
  150 pm, ellipse 120 pm, dimer of two lobes 100 pm) at random orientations on a jittered grid;
  references: one object of each species picked from the frame itself
  (:func:`agent.pipeline.reference_crop_at`, as ``refs add --at``).

Per frame and repeat: ``parse`` (:func:`adapters.sxm.read_sxm` of the file), the pipeline stages of
:meth:`agent.pipeline.Recognizer.recognise` (``timings_ms``), ``publish`` = ``FrameResult.to_json``
+ :class:`adapters.zmq_io.Publisher` on ``tcp://127.0.0.1:*`` until a connected
:class:`adapters.zmq_io.Subscriber` has received the message; ``total`` = end-to-end latency from
the start of the file read to the message received. Medians over ``--repeats``.

Baseline (UniMR GUI style): the same normalised crops, each embedded alone (batch of 1) and matched
in a Python loop (one :func:`agent.match.species_scores` + :func:`agent.match.assign` per crop).
``baseline`` = the measured parse .. normalise + that per-crop encode/match + publish;
``speed-up`` = baseline / total, ``x enc+match`` = per-crop / batched encode + match.
Embedding cache (CLIP): cleared before every timed repeat, so ``total`` is the cost of a NEW frame;
``CPU s`` = CPU time of this process for ``total`` (all threads; on an idle machine
``total`` ~ ``CPU s`` / cores used, a figure less sensitive to other processes than wall time).
``re-run`` is the same frame processed once more with the crops' embeddings cached (a re-published
or re-processed frame). The reference pose embeddings are computed before timing (warm reference
cache, as in a running agent). The header prints the CPU, the load average and the encoder id.

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of this process (a high-water mark over
the whole run). ``acc`` (synthetic frames): fraction of the molecules whose nearest detection
(within 1 nm) carries the right species.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from stm_agent.adapters.references import ReferenceLibrary  # noqa: E402
from stm_agent.adapters.sxm import read_sxm  # noqa: E402
from stm_agent.adapters.zmq_io import Publisher, Subscriber  # noqa: E402
from stm_agent.agent.config import AgentConfig  # noqa: E402
from stm_agent.agent.match import assign, species_scores  # noqa: E402
from stm_agent.agent.normalise import normalise_crops  # noqa: E402
from stm_agent.agent.pipeline import Recognizer, detect, reference_crop_at  # noqa: E402
from stm_agent.agent.references import object_extent_nm, window_nm  # noqa: E402

DATA = REPO / ".." / "shared" / "data" / "sxm"
PIXEL_NM = 0.1
SPECIES = ("round", "ellipse", "dimer")
STAGES = ("parse", "flatten", "segment", "normalise", "encode", "match", "publish")


# ------------------------------------------------------------------ synthetic .sxm frames
def write_sxm(path: Path, z_m: np.ndarray, pixel_nm: float) -> None:
    """Write a minimal Nanonis .sxm file: one channel ``Z`` (m), forward only, big-endian float32.

    Layout as read by :func:`adapters.sxm.read_sxm`: text header of ``:KEY:`` sections ending with
    ``:SCANIT_END:``, ``\\n\\n\\n``, the ``\\x1a\\x04`` marker, then ``ny`` rows of ``nx`` values.
    """
    ny, nx = z_m.shape
    head = (
        ":NANONIS_VERSION:\n2\n:SCANIT_TYPE:\n              FLOAT            MSBFIRST\n"
        ":REC_DATE:\n01.01.2024\n:REC_TIME:\n12:00:00\n:REC_TEMP:\n290.0\n:ACQ_TIME:\n100.0\n"
        f":SCAN_PIXELS:\n       {nx}       {ny}\n:SCAN_FILE:\n{path}\n:SCAN_TIME:\n1.0E+0 1.0E+0\n"
        f":SCAN_RANGE:\n           {nx * pixel_nm * 1e-9:.6E}           {ny * pixel_nm * 1e-9:.6E}\n"
        ":SCAN_OFFSET:\n             0.000000E+0         0.000000E+0\n:SCAN_ANGLE:\n            0.000E+0\n"
        ":SCAN_DIR:\ndown\n:BIAS:\n            1.000E+0\n:COMMENT:\nsynthetic benchmark frame\n"
        ":DATA_INFO:\n\tChannel\tName\tUnit\tDirection\tCalibration\tOffset\n"
        "\t14\tZ\tm\tforward\t1.000E+0\t0.000E+0\n\n:SCANIT_END:\n\n\n"
    )
    path.write_bytes(head.encode("latin-1") + b"\x1a\x04" + np.ascontiguousarray(z_m, ">f4").tobytes())


def synthetic_frame(n: int, n_obj: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rough ``(n, n)`` topography (m) with ``n_obj`` molecules of :data:`SPECIES`.

    Returns ``(z float32 (n, n) m, centres float (n_obj, 2) (x, y) px, species int (n_obj,))``.
    Molecules sit on a jittered grid (no overlap) and are rendered each in its own window.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    z = (2e-12 * xx + 1e-12 * yy + rng.normal(0, 5e-12, (n, n))).astype(np.float32)
    for k in range(2):  # two straight steps of 40 pm
        a = rng.uniform(0, np.pi)
        z += np.float32(40e-12) * ((np.cos(a) * (xx - n * (k + 1) / 3) + np.sin(a) * (yy - n / 2)) > 0)
    cells = int(np.ceil(np.sqrt(n_obj)))
    step = n / cells
    if step * PIXEL_NM < 2.8:
        raise SystemExit(f"{n_obj} objects do not fit in {n}x{n} px without overlap")
    idx = rng.choice(cells * cells, n_obj, replace=False)
    cen = np.column_stack([(idx % cells + 0.5) * step, (idx // cells + 0.5) * step])
    cen += rng.uniform(-0.2, 0.2, cen.shape) * step
    sp = rng.integers(0, len(SPECIES), n_obj)
    half = int(np.ceil(1.6 / PIXEL_NM))
    wy, wx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    for (cx, cy), s in zip(cen, sp):
        x0, y0 = int(round(cx)), int(round(cy))
        th = rng.uniform(0, np.pi)
        u = ((wx + x0 - cx) * np.cos(th) + (wy + y0 - cy) * np.sin(th)) * PIXEL_NM  # nm, object axes
        v = (-(wx + x0 - cx) * np.sin(th) + (wy + y0 - cy) * np.cos(th)) * PIXEL_NM
        if s == 0:
            m = 150e-12 * np.exp(-(u ** 2 + v ** 2) / (2 * 0.45 ** 2))
        elif s == 1:
            m = 120e-12 * np.exp(-(u ** 2 / (2 * 0.8 ** 2) + v ** 2 / (2 * 0.3 ** 2)))
        else:
            m = 100e-12 * (np.exp(-((u - 0.5) ** 2 + v ** 2) / (2 * 0.3 ** 2))
                           + np.exp(-((u + 0.5) ** 2 + v ** 2) / (2 * 0.3 ** 2)))
        ys, xs = slice(max(y0 - half, 0), min(y0 + half + 1, n)), slice(max(x0 - half, 0), min(x0 + half + 1, n))
        z[ys, xs] += m[ys.start - (y0 - half):ys.stop - (y0 - half), xs.start - (x0 - half):xs.stop - (x0 - half)]
    return z, cen, sp


# ------------------------------------------------------------------ one frame
def make_references(path: Path, cfg: AgentConfig, truth: tuple[np.ndarray, np.ndarray] | None) -> int:
    """Fill ``cfg.references.folder`` from the frame itself; returns the number of species."""
    scan = read_sxm(path)
    _, regions = detect(scan, cfg)
    inner = [r for r in regions if not r.touches_edge]
    lib = ReferenceLibrary(cfg.references.folder)
    if truth is None:  # real scan: the two largest whole objects
        picks = [(f"obj{k}", r.centroid_px) for k, r in enumerate(sorted(inner, key=lambda r: -r.area_px)[:2])]
    else:  # synthetic: the detection nearest to a molecule of each species
        cen, sp = truth
        rc = np.array([r.centroid_px for r in inner])
        picks = []
        for k, name in enumerate(SPECIES):
            d = np.hypot(*(rc[:, None, :] - cen[None, sp == k, :]).transpose(2, 0, 1)).min(axis=1)
            picks.append((name, inner[int(np.argmin(d))].centroid_px))
    for name, (x, y) in picks:
        crop, ps, prov = reference_crop_at(scan, x, y, cfg, units="px")
        lib.add(name, crop, ps, prov)
    return len(picks)


def bench_frame(path: Path, rec: Recognizer, pub: Publisher, sub: Subscriber, repeats: int,
                baseline: bool, truth=None) -> dict[str, float]:
    """Median stage times (ms), objects, baseline (ms) and accuracy of one frame file."""
    rows, base = [], []
    cache = getattr(rec.encoder, "cache", None)
    for _ in range(repeats):
        if cache is not None:
            cache.clear()  # a new frame: no crop seen before
        c0 = time.process_time()
        t0 = time.perf_counter()
        scan = read_sxm(path)
        t1 = time.perf_counter()
        res = rec.recognise(scan)
        t2 = time.perf_counter()
        msg = res.to_json()
        pub.publish("frame.counts", msg)
        got = sub.recv(timeout_ms=10000)
        t3 = time.perf_counter()
        if got is None or got[1].get("frame_id") != scan.frame_id:
            raise SystemExit("the subscriber did not receive the frame message")
        tm = res.timings_ms
        rows.append({"parse": (t1 - t0) * 1e3, **{k: tm[k] for k in STAGES[1:6]},
                     "publish": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3,
                     "cpu": time.process_time() - c0})
        if baseline:  # the same crops, one at a time
            image, regions = res.image, res.detections
            centres = np.array([d.centroid_px for d in regions], np.float64).reshape(-1, 2)
            wins = window_nm(object_extent_nm([d.bbox_px for d in regions], scan.pixel_size_nm), rec.cfg.normalise)
            grey = normalise_crops(image, centres, wins, scan.pixel_size_nm, rec.cfg.normalise)
            t_used = res.encoder["threshold"]["value"]
            if cache is not None:
                cache.clear()
            t4 = time.perf_counter()
            for g in grey:
                e = rec.encoder.embed(g[None])
                s, b = species_scores(e, rec.refs)
                assign(s, b, rec.refs, t_used)
            base.append((time.perf_counter() - t4) * 1e3)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    t5 = time.perf_counter()  # the same frame again, crop embeddings cached
    rec.recognise(read_sxm(path))
    med["rerun"] = (time.perf_counter() - t5) * 1e3
    med["objects"] = len(res.detections)
    enc_match = med["encode"] + med["match"]
    if baseline:
        b = float(np.median(base))
        med["baseline"] = med["total"] - enc_match + b
        med["speedup"] = med["baseline"] / med["total"]
        med["x_em"] = b / enc_match if enc_match > 0 else float("nan")
    if truth is not None:
        cen, sp = truth
        dc = np.array([d.centroid_px for d in res.detections]).reshape(-1, 2)
        if len(dc):
            dist = np.hypot(*(cen[:, None, :] - dc[None, :, :]).transpose(2, 0, 1))
            j = np.argmin(dist, axis=1)
            ok = (dist[np.arange(len(cen)), j] * PIXEL_NM <= 1.0) & (
                np.array([res.detections[i].species for i in j]) == np.array(SPECIES)[sp])
            med["acc"] = float(ok.mean())
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--objects", type=int, nargs="*", default=[50, 200, 600])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoder", choices=["pixel", "zernike", "clip"], default="pixel")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--precision", default="auto", help="clip: encoder.precision (auto = int8 on a CPU)")
    ap.add_argument("--threshold", default=None,
                    help="match.threshold (a number, or auto: per-frame null sample of background windows, "
                         "embedded too: with clip it adds up to 48 crops per species to every frame)")
    ap.add_argument("--real", nargs="*", default=["au111_adsorbates_10nm_256_up.sxm",
                                                  "cu111_tcne_steps_clusters_50nm_256_down.sxm",
                                                  "si111_7x7_atoms_defects_20nm_256_down.sxm"])
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--old", action="store_true",
                    help="also run each frame with the released detection (segment.method: otsu, channel: Z) "
                         "and print the ratio new / old per stage")
    a = ap.parse_args()
    if len(a.objects) != len(a.sizes):
        raise SystemExit("--objects needs one count per --sizes entry")
    if a.encoder == "clip" and a.model_dir is None:
        raise SystemExit("--encoder clip needs --model-dir")
    with tempfile.TemporaryDirectory() as td, Publisher("tcp://127.0.0.1:*") as pub, \
            Subscriber(pub.endpoint) as sub:
        time.sleep(0.3)  # let the SUB connection settle (slow joiner)
        frames: list[tuple[str, Path, object]] = [(f.split("_")[0] + "_" + f.split("_")[-2], DATA / f, None) for f in a.real]
        for n, k in zip(a.sizes, a.objects):
            z, cen, sp = synthetic_frame(n, k, seed=n)
            p = Path(td) / f"synthetic_{n}_{k}.sxm"
            write_sxm(p, z, PIXEL_NM)
            frames.append((f"synth {n}^2", p, (cen, sp)))
        hdr = (f"{'frame':<18}" + "".join(f"{s:>10}" for s in STAGES) + f"{'total ms':>10}{'objects':>8}"
               + ("" if a.no_baseline else f"{'baseline':>10}{'speed-up':>9}{'x enc+m':>8}") + f"{'acc':>6}"
               + f"{'re-run':>9}{'CPU s':>7}")
        from bench_encoders import cpu_summary, load_avg

        print(f"CPU: {cpu_summary()}; load average at start: {load_avg()}")
        print(f"encoder {a.encoder}, medians over {a.repeats} repeats, times in ms")
        print(hdr)
        jobs = [(name, path, truth, old) for name, path, truth in frames for old in ([False, True] if a.old else [False])]
        for i, (name, path, truth, old) in enumerate(jobs):
            cfg = AgentConfig()
            if old:  # the pipeline before issue 10: Otsu + outer contours on Z
                cfg.segment.method, cfg.channel = "otsu", "Z"
                name = f"  old ({name.strip()})"[:18]
            cfg.references.folder = Path(td) / f"refs{i}"
            cfg.encoder.name = a.encoder
            if a.model_dir is not None:
                cfg.encoder.model_dir = a.model_dir
            cfg.encoder.precision = a.precision
            if a.threshold is not None:
                cfg.match.threshold = a.threshold if a.threshold == "auto" else float(a.threshold)
            make_references(path, cfg, truth)
            rec = Recognizer.from_config(cfg)
            if i == 0:
                print(f"encoder id {rec.encoder.id}")
            m = bench_frame(path, rec, pub, sub, a.repeats, not a.no_baseline, truth)
            line = f"{name:<18}" + "".join(f"{m[s]:>10.1f}" for s in STAGES) + f"{m['total']:>10.1f}{m['objects']:>8d}"
            if not a.no_baseline:
                line += f"{m['baseline']:>10.1f}{m['speedup']:>9.2f}{m['x_em']:>8.1f}"
            line += f"{m['acc']:>6.2f}" if "acc" in m else f"{'-':>6}"
            line += f"{m['rerun']:>9.1f}{m['cpu']:>7.1f}"
            if not old:
                det = rec.recognise(read_sxm(path)).detection
                line += f"  {det.get('method')} {det.get('size_source')}"
                new_m = m
            else:
                line += "  new/old: " + " ".join(f"{s} {new_m[s] / m[s]:.2f}" for s in ("segment", "total") if m[s] > 0)
            print(line, flush=True)
        print(f"load average at end: {load_avg()}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          "(high-water mark over the whole run)")


if __name__ == "__main__":
    main()
