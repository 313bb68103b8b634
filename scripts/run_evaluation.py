"""Run `stm-agent evaluate` on every shared labelled set in one run and regenerate docs/results.md.

Writes docs/results/<run>.json + PNGs (confusion per entry, F1-vs-threshold sweep), then runs
scripts/results_md.py. The DEFAULT configuration (config/default.yaml) for every set: no per-set
setting. Entries: the default encoder (pixel), zernike and unimr-as-released side by side; K = 1;
--seeds draws (10). End to end on the image sets, recognition-only (labelled boxes, and the crop
sets) with leave-one-class-out on sets of >= 2 classes. Optional (--clip): CLIP runs with a tiny
random-weight model exported here (models.export.TINY_TEST_CONFIG): a path check, not a result.

Usage: nice python scripts/run_evaluation.py [--seeds 10] [--quick] [--only RUN ...] [--clip]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from stm_agent.agent.cli_evaluate import evaluate  # noqa: E402

DATA = (REPO / ".." / "shared" / "data" / "labelled").resolve()
OUT = REPO / "docs" / "results"
MAIN = "pixel,zernike,unimr-as-released"

#: (run name, set folder, mode, entries) -- every shared labelled set, default configuration
RUNS = [
    ("sparse_e2e", "sparse", "end-to-end", MAIN),
    ("sparse_rec", "sparse", "recognition", MAIN),
    ("fhpb_e2e", "fhpb", "end-to-end", MAIN),
    ("fhpb_rec", "fhpb", "recognition", MAIN),
    ("crops_FHPB", "crops/FHPB", "recognition", MAIN),
    ("crops_Monoradical", "crops/Monoradical", "recognition", MAIN),
    ("wse2_e2e", "wse2_defects", "end-to-end", MAIN),
    ("wse2_rec", "wse2_defects", "recognition", MAIN),
]
CLIP_RUNS = [
    ("sparse_rec_cliprandom", "sparse", "recognition"),
    ("fhpb_rec_cliprandom", "fhpb", "recognition"),
    ("crops_FHPB_cliprandom", "crops/FHPB", "recognition"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--clip", action="store_true", help="also the random-weight CLIP path checks")
    ap.add_argument("--clip-seeds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="run only these run names (then regenerate results.md)")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 3 images per set (smoke run)")
    a = ap.parse_args(argv)
    app = typer.Typer()
    app.command()(evaluate)
    app.callback()(lambda: None)
    runner = CliRunner()
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = 2 if a.quick else a.seeds
    extra_q = ["--max-images", "3"] if a.quick else []

    def run(name: str, args: list[str]) -> None:
        t0 = time.perf_counter()
        r = runner.invoke(app, ["evaluate", *args, "--out", str(OUT), "--name", name, *extra_q])
        if r.exit_code != 0:
            print(r.output[-3000:])
            raise SystemExit(f"{name} failed: {r.exception!r}")
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)

    for name, folder, mode, entries in RUNS:
        if a.only and name not in a.only:
            continue
        run(name, [str(DATA / folder), "--mode", mode, "--compare", entries, "--seeds", str(seeds)])
    if a.clip:
        with tempfile.TemporaryDirectory() as tmp:
            from stm_agent.models.export import TINY_TEST_CONFIG, export_clip

            mdir = Path(tmp) / "tiny-clip-random"
            export_clip("tiny-eval-random", None, mdir, model_cfg=TINY_TEST_CONFIG)
            for name, folder, mode in CLIP_RUNS:
                if a.only and name not in a.only:
                    continue
                run(name, [str(DATA / folder), "--mode", mode, "--compare", "clip", "--model-dir", str(mdir),
                           "--seeds", str(min(seeds, a.clip_seeds))])
    subprocess.run([sys.executable, str(REPO / "scripts" / "results_md.py")], check=True)
    big = [p for p in OUT.glob("*.png") if p.stat().st_size > 200_000]
    if big:
        print("PNG over 200 kB:", big)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
