"""Run `stm-agent evaluate` on every labelled set and regenerate docs/results.md.

Writes docs/results/<run>.json + PNGs (confusion per entry, F1-vs-threshold sweep), then runs
scripts/results_md.py. Settings are the defaults of config/default.yaml for every set, with ONE
documented exception: the F-HPB runs are repeated with `normalise.mirror=false` (the user knows the
set is chiral; the default mirror=true run is reported too). CLIP runs use a tiny random-weight
model exported here (models.export.TINY_TEST_CONFIG, pretrained=None): a path check, not a result.

Usage: nice python scripts/run_evaluation.py [--seeds 10] [--quick]
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
MAIN = "pixel,zernike,auto,unimr-as-released"

#: (run name, set folder, mode, entries, extra CLI args)
RUNS = [
    ("sparse_e2e", "sparse", "end-to-end", MAIN, []),
    ("sparse_rec", "sparse", "recognition", MAIN, []),
    ("fhpb_e2e", "fhpb", "end-to-end", MAIN, []),
    ("fhpb_e2e_nomirror", "fhpb", "end-to-end", MAIN, ["--set", "normalise.mirror=false"]),
    ("fhpb_rec", "fhpb", "recognition", MAIN, []),
    ("fhpb_rec_nomirror", "fhpb", "recognition", MAIN, ["--set", "normalise.mirror=false"]),
    ("crops_FHPB", "crops/FHPB", "recognition", MAIN, []),
    ("crops_FHPB_nomirror", "crops/FHPB", "recognition", MAIN, ["--set", "normalise.mirror=false"]),
    ("crops_Monoradical", "crops/Monoradical", "recognition", MAIN, []),
    ("wse2_e2e", "wse2_defects", "end-to-end", MAIN + ",pixel+descriptors", []),
    ("wse2_rec", "wse2_defects", "recognition", MAIN, []),
]
CLIP_RUNS = [
    ("sparse_rec_cliprandom", "sparse", "recognition"),
    ("fhpb_rec_cliprandom", "fhpb", "recognition"),
    ("crops_FHPB_cliprandom", "crops/FHPB", "recognition"),
    ("crops_Monoradical_cliprandom", "crops/Monoradical", "recognition"),
    ("wse2_rec_cliprandom", "wse2_defects", "recognition"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--clip-seeds", type=int, default=3)
    ap.add_argument("--wse2-seeds", type=int, default=5, help="draws on wse2_defects (725 boxes, ~2600 regions: slow)")
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

    for name, folder, mode, entries, extra in RUNS:
        if a.only and name not in a.only:
            continue
        n = min(seeds, a.wse2_seeds) if folder == "wse2_defects" else seeds
        run(name, [str(DATA / folder), "--mode", mode, "--compare", entries, "--seeds", str(n), *extra])
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
