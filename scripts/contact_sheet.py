"""Contact sheet: default-config, no-reference overlays of every shared real .sxm scan in one PNG.

    python scripts/contact_sheet.py --out sheet [--data ../shared/data/sxm] [--config my.yaml]

Each tile is the overlay the agent writes for a scan (:func:`adapters.outputs.render_overlay`:
boxes of the detected objects, counts, encoder, channel and detector in the legend), reduced to a
common tile size, with the file name on top. With no reference library every object is ``other``:
the sheet shows what detection finds, which is what a person checks by eye (objects whole, no
background region or step edge counted, no black frame). Scans that cannot be analysed get a tile
with the error. Writes ``<out>/contact_sheet.png`` and prints one line per scan.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from stm_agent.adapters.outputs import render_overlay
from stm_agent.adapters.scanfile import read_scan
from stm_agent.agent.config import load_config
from stm_agent.agent.errors import StmAgentError
from stm_agent.agent.pipeline import Recognizer

TILE = 420  # tile height, px
COLS = 4


def _tile(img: np.ndarray | None, title: str, note: str = "") -> np.ndarray:
    """BGR tile of height TILE (overlay resized, title bar on top)."""
    bar = 34
    if img is None:
        body = np.full((TILE, int(TILE * 1.35), 3), 40, np.uint8)
    else:
        s = TILE / img.shape[0]
        body = cv2.resize(img, (max(1, int(round(img.shape[1] * s))), TILE), interpolation=cv2.INTER_AREA)
        body = body[:, : int(TILE * 1.35)]
        if body.shape[1] < int(TILE * 1.35):
            body = np.concatenate([body, np.full((TILE, int(TILE * 1.35) - body.shape[1], 3), 30, np.uint8)], 1)
    head = np.full((bar, body.shape[1], 3), 255, np.uint8)
    cv2.putText(head, title[:58], (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if note:
        for k, line in enumerate([note[i:i + 60] for i in range(0, min(len(note), 360), 60)]):
            cv2.putText(body, line, (8, 40 + 22 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (80, 80, 255), 1, cv2.LINE_AA)
    return np.concatenate([head, body], 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sxm"))
    ap.add_argument("--out", type=Path, required=True, help="output folder (contact_sheet.png)")
    ap.add_argument("--config", type=Path, default=None, help="YAML config (default: the default config)")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such folder (the shared data, ../shared/data/sxm)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as empty:
        cfg = load_config(args.config, overrides={"references": {"folder": empty}})
        rec = Recognizer.from_config(cfg, allow_empty=True)
        tiles = []
        for path in sorted(args.data.glob("*.sxm")):
            try:
                scan = read_scan(path)
                res = rec.recognise(scan)
            except StmAgentError as e:
                print(f"{path.name:48s} error: {e}")
                tiles.append(_tile(None, path.name, str(e).split(": ", 1)[-1]))
                continue
            ov = render_overlay(res, res.image, scan.pixel_size_nm)
            det = res.detection
            size = det.get("object_size_nm")
            print(f"{path.name:48s} {res.n_objects:4d} objects  channel {res.channel:8s} {det.get('method')}"
                  f" {size if size is None else f'{size:.3g} nm'} ({det.get('size_source')})"
                  f"  {res.timings_ms['total']:.0f} ms  {det.get('note') or ''}")
            tiles.append(_tile(ov, path.name))
    w = max(t.shape[1] for t in tiles)
    tiles = [np.concatenate([t, np.full((t.shape[0], w - t.shape[1], 3), 255, np.uint8)], 1) for t in tiles]
    while len(tiles) % COLS:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i:i + COLS], 1) for i in range(0, len(tiles), COLS)]
    sheet = np.concatenate(rows, 0)
    out = args.out / "contact_sheet.png"
    cv2.imwrite(str(out), sheet)
    print(f"wrote {out} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
    main()
