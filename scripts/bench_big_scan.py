#!/usr/bin/env python
"""Peak memory of reading and recognising one large .sxm (issue 15, finding 6); prints figures.

Builds a valid scan of ``--side`` x ``--side`` pixels and ``--frames`` frames by tiling the Z frame of
a real scan (so it holds real objects), writes it under a temporary folder, then in a fresh child
process reads it with :func:`adapters.sxm.read_sxm` and recognises it (pixel encoder, one reference
cut from the same real scan), and prints the data size, the peak RSS and their ratio.

Usage: python scripts/bench_big_scan.py [--side 2048] [--frames 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO / ".." / "shared" / "data" / "sxm" / "au111_adsorbates_10nm_256_up.sxm"


def build(side: int, frames: int, out: Path) -> Path:
    """A valid .sxm of ``side`` x ``side`` px, ``frames`` frames (Z and extra channels, both ways)."""
    from stm_agent.adapters.sxm import read_sxm

    raw = SCAN.read_bytes()
    src = read_sxm(raw, name=SCAN.name)
    z = src.frame("Z")
    tiles = -(-side // z.shape[0])
    big = np.tile(z, (tiles, tiles))[:side, :side].astype(">f4")
    head = raw[: raw.index(b":SCANIT_END:")].decode("latin-1")
    rng = float(src.range_nm[0]) * 1e-9 * side / z.shape[1]
    head = re.sub(r"(:SCAN_PIXELS:\n)[^\n]*", lambda m: m.group(1) + f"       {side}       {side}", head)
    head = re.sub(r"(:SCAN_RANGE:\n)[^\n]*", lambda m: m.group(1) + f"           {rng:.6E}           {rng:.6E}", head)
    n_ch = max(frames // 2, 1)  # every channel recorded both ways
    table = "\tChannel\tName\tUnit\tDirection\tCalibration\tOffset\n" + "".join(
        f"\t{14 + i}\t{'Z' if i == 0 else f'Ch{i}'}\tm\tboth\t1.000E+0\t0.000E+0\n" for i in range(n_ch))
    head = re.sub(r":DATA_INFO:\n[\s\S]*?(?=\n:|$)", lambda m: ":DATA_INFO:\n" + table, head, count=1)
    frames = 2 * n_ch
    path = out / f"big_{side}_{frames}.sxm"
    with open(path, "wb") as f:
        f.write(head.encode("latin-1") + b":SCANIT_END:\n\n\n\x1a\x04")
        for _ in range(frames):
            f.write(big.tobytes())
    return path


def child(path: str, refs: str) -> None:
    from stm_agent.adapters.sxm import read_sxm
    from stm_agent.agent.config import AgentConfig
    from stm_agent.agent.pipeline import Recognizer

    rec = Recognizer.from_config(AgentConfig(references={"folder": refs}))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    scan = read_sxm(path)
    t_read = time.perf_counter() - t0
    res = rec.recognise(scan)
    t_all = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"frames in scan: {sum(len(v) for v in scan.channels.values())}  objects: {res.n_objects}  "
          f"read {t_read:.1f} s, read+recognise {t_all:.1f} s")
    print(f"RSS before {base:.0f} MB, peak {peak:.0f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.adapters.sxm import read_sxm
    from stm_agent.agent.config import AgentConfig
    from stm_agent.agent.pipeline import detect, reference_crop_at

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build(args.side, args.frames, tmp)
        scan = read_sxm(SCAN)
        cfg = AgentConfig()
        _, regions = detect(scan, cfg)
        reg = next(r for r in regions if not r.touches_edge)
        crop, ps, prov = reference_crop_at(scan, *reg.centroid_px, cfg, units="px")
        ReferenceLibrary(tmp / "refs").add("adsorbate", crop, ps, prov)
        size = path.stat().st_size
        print(f"file: {args.side} x {args.side} px x {args.frames} frames = {size / 2**20:.0f} MiB")
        out = subprocess.run([sys.executable, __file__, "--child", str(path), str(tmp / "refs")],
                             capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
