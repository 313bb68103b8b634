#!/usr/bin/env python
"""Fuzz adapters.sxm and the recogniser with mutated real scans for a fixed time; print inputs and crashes.

A crash is any exception other than a typed stm-agent error (StmAgentError: ScanFormatError from
the reader, ScanGeometryError / MissingChannelError from the pipeline); a result whose JSON holds a
NaN or an infinity (published as null, which the message schema rejects) counts as a crash too.
Each input is a real file from ../shared/data/sxm with 1-3 stacked mutations: truncation, byte
flips in header or data, deletion of a header key, absurd or random SCAN_PIXELS, junk inserted into
the header, duplicated/removed DATA_INFO rows, changed Direction column, extreme but finite numbers
in SCAN_RANGE / SCAN_OFFSET / SCAN_ANGLE / BIAS, renamed channels. With ``--pipeline`` (default)
every input that reads is also recognised (:class:`agent.pipeline.Recognizer`, pixel encoder, one
reference species cut from a real scan). Crashing inputs are saved to --out.

Usage: python scripts/fuzz_sxm.py [--seconds 180] [--seed 0] [--out DIR] [--no-pipeline]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from stm_agent.adapters.sxm import expected_size, read_sxm  # noqa: E402
from stm_agent.agent.errors import ScanFormatError, StmAgentError  # noqa: E402

_EXTREME = [b"1e300 1e300", b"1e-300 1e-300", b"1e-11 1e-11", b"5e-324 1e-9", b"1.7976931348623157e308 1",
            b"-1e300 1e300", b"0 0", b"1e-9", b"1e308 1e-308", b"3e-8 3e-8", b"1 1", b"1e-12 1e-12"]
_KEY = re.compile(rb"^:[^\n\t]*:\n", re.M)


def mutate(b: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of ``b``; returns the new bytes and its kind."""
    end = b.find(b":SCANIT_END:")
    head_end = end if end > 0 else min(len(b), 4096)
    kind = rng.choice(["truncate", "flip_header", "flip_data", "delete_key", "pixels", "insert", "direction", "row",
                       "marker", "numbers", "numbers", "channel"])
    n = len(b)
    if n == 0:
        return b"\x1a", "empty"
    if kind == "truncate":
        return b[: rng.randrange(n)], kind
    if kind == "flip_header":
        i = rng.randrange(max(head_end, 1))
        return b[:i] + bytes([rng.randrange(256)]) + b[i + 1 :], kind
    if kind == "flip_data":
        i = rng.randrange(n)
        return b[:i] + bytes([rng.randrange(256)]) * rng.randint(1, 8) + b[i + 1 :], kind
    if kind == "delete_key":
        keys = list(_KEY.finditer(b, 0, head_end))
        if len(keys) < 2:
            return b[:-1], kind
        k = rng.randrange(len(keys) - 1)
        return b[: keys[k].start()] + b[keys[k + 1].start() :], kind
    if kind == "pixels":
        vals = [rng.choice([0, 1, 2, 65535, 65536, 65537, 10**9, 2**31, 2**63, -5, rng.randrange(1, 600)]) for _ in range(2)]
        txt = rng.choice([b"%d %d" % tuple(vals), b"%d" % vals[0], b"1e3 5", b"", b"x y"])
        return re.sub(rb"(:SCAN_PIXELS:\n)[^\n]*", lambda m: m.group(1) + txt, b, count=1), kind
    if kind == "insert":
        i = rng.randrange(max(head_end, 1))
        junk = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randint(1, 30))), b"\n:", b":X:\n", b"\t", b"\n\n:SCANIT_END:\n", b"\x1a\x04"])
        return b[:i] + junk + b[i:], kind
    if kind == "direction":
        return b.replace(b"\tboth\t", rng.choice([b"\tforward\t", b"\tbackward\t", b"\tBOTH\t", b"\t\t", b"\tup\t"]), rng.randint(1, 3)), kind
    if kind == "row":
        m = re.search(rb"(:DATA_INFO:\n[^\n]*\n)(\t[^\n]*\n)", b)
        if not m:
            return b, kind
        row = m.group(2)
        return b[: m.end(1)] + rng.choice([row * 2, b"", row[:5] + b"\n", row.replace(b"\t", b" ")]) + b[m.end(2) :], kind
    if kind == "numbers":
        key = rng.choice([b"SCAN_RANGE", b"SCAN_OFFSET", b"SCAN_ANGLE", b"BIAS", b"ACQ_TIME"])
        val = rng.choice(_EXTREME)
        return re.sub(rb"(:" + key + rb":\n)[^\n]*", lambda m: m.group(1) + val, b, count=1), kind
    if kind == "channel":
        return b.replace(b"\tZ\t", rng.choice([b"\tY\t", b"\tz\t", b"\t\t"]), 1), kind
    if kind == "marker":
        return b.replace(b"\x1a\x04", rng.choice([b"\x1a", b"", b"\x1a\x05", b"\x1a\x04\x1a\x04"]), 1), kind
    raise AssertionError(kind)


def _recognizer(data: Path):
    """A Recognizer (pixel encoder) with one reference species cut from a real scan."""
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.agent.config import AgentConfig
    from stm_agent.agent.pipeline import Recognizer, detect, reference_crop_at

    scan = read_sxm(data / "au111_adsorbates_10nm_256_up.sxm")
    cfg = AgentConfig()
    cfg.references.folder = Path(tempfile.mkdtemp(prefix="fuzz_refs_"))
    _, regions = detect(scan, cfg)
    ref = next(r for r in regions if not r.touches_edge)
    crop, ps, prov = reference_crop_at(scan, *ref.centroid_px, cfg, units="px")
    ReferenceLibrary(cfg.references.folder).add("adsorbate", crop, ps, prov)
    return Recognizer.from_config(cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sxm")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sxm_crashes")
    ap.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="only the reader")
    args = ap.parse_args()
    files = sorted(args.data.glob("*.sxm")) + sorted((args.data / "bad").glob("*"))
    if not files:
        print(f"no .sxm files in {args.data}", file=sys.stderr)
        return 2
    originals = [p.read_bytes() for p in files]
    rec = _recognizer(args.data) if args.pipeline else None
    rng = random.Random(args.seed)
    tried = crashes = 0
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    crash_types: Counter[str] = Counter()
    slowest = 0.0
    t_end = time.monotonic() + args.seconds
    while time.monotonic() < t_end:
        data = originals[rng.randrange(len(originals))]
        for _ in range(rng.randint(1, 3)):
            data, kind = mutate(data, rng)
            kinds[kind] += 1
        tried += 1
        t0 = time.perf_counter()
        try:
            try:
                expected_size(data)
            except ScanFormatError:
                pass
            scan = read_sxm(data, name="fuzz")
            outcomes["read ok"] += 1
            if rec is not None:
                res = rec.recognise(scan)
                json.dumps(res.to_json(), allow_nan=False)  # NaN/inf would be published as null
                outcomes["recognised"] += 1
        except StmAgentError as exc:
            outcomes[type(exc).__name__] += 1
        except Exception as exc:  # noqa: BLE001 - that is what we are hunting
            crashes += 1
            crash_types[f"{type(exc).__name__}: {exc}"[:120]] += 1
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"crash_{crashes:04d}.sxm").write_bytes(data)
            if crashes <= 3:
                traceback.print_exc()
        slowest = max(slowest, time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"seconds: {args.seconds:.0f}  seed: {args.seed}  source files: {len(files)}  pipeline: {args.pipeline}")
    print(f"inputs tried: {tried}  ({tried / args.seconds:.0f}/s)")
    print(f"crashes (untyped exceptions): {crashes}")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    print("mutations: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    print(f"slowest input: {slowest * 1e3:.1f} ms  peak RSS: {peak_mb:.0f} MB")
    for k, v in crash_types.most_common(10):
        print(f"  {v} x {k}")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
