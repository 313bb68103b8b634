"""Batch throughput (frames/s) on the shared scans: the daemon's serial worker, ``batch`` with 1 and 2
local processes, and ``batch --dask`` on a 2-worker LocalCluster; ratio of each to the daemon.

    python scripts/bench_batch.py [--repeats 2] [--with-images] [--copies N]

Input: every ``.sxm`` under ../shared/data/sxm (26 good + 7 broken scans), and with
``--with-images`` also the 27 wse2_defects JPGs (512-2048 px, ``--pixel-size 0.1``; larger frames).
Library: one species (an Au(111) adsorbate), encoder ``pixel`` (the default). Every run writes a
fresh ``--out`` (store, JSON, overlay PNG), so each measures all the work; batch times include
starting the worker processes (spawn; "first result after" shows that start-up); the LocalCluster is started before the clock (an "existing"
cluster). Prints the median over ``--repeats`` and the machine load.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from stm_agent.adapters.arrival import Arrival
from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.scanfile import read_scan
from stm_agent.agent.batch import run_batch
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.daemon import Agent
from stm_agent.agent.pipeline import detect, reference_crop_at

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def make_refs(folder: Path) -> None:
    scan = read_scan(DATA / "sxm" / "au111_adsorbates_10nm_256_up.sxm")
    cfg = AgentConfig()
    _, regions = detect(scan, cfg)
    reg = next(r for r in regions if not r.touches_edge)
    crop, px, prov = reference_crop_at(scan, *reg.centroid_px, cfg, units="px")
    ReferenceLibrary(folder).add("adsorbate", crop, px, prov)


def cfg_for(tmp: Path, refs: Path, root: Path = DATA / "sxm") -> AgentConfig:
    return AgentConfig(references={"folder": str(refs)}, acquisition={"enabled": False, "folder": str(root.resolve())},
                       results={"store": str(tmp / "d.sqlite"), "out_dir": str(tmp / "d_out")},
                       publish={"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0, "query_endpoint": None})


def daemon_rate(files: list[Path], tmp: Path, refs: Path, pixel_size: float | None) -> float:
    """Frames/s of the daemon's worker (Agent.process_next) over ``files`` queued in its inbox."""
    agent = Agent(cfg_for(tmp, refs, files[0].parent), sources=[])
    try:
        for p in files:
            agent.submit(Arrival(path=p, frame_id=hashlib.sha256(p.read_bytes()).hexdigest(), size=p.stat().st_size,
                                 received_at=datetime.now(timezone.utc), received_mono=time.monotonic()))
        t0 = time.perf_counter()
        n = 0
        while agent.process_next() is not None:
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        agent.publisher.close()
        agent.store.close()


def make_archive(folder: Path, copies: int) -> list[Path]:
    """``copies`` copies of every good shared scan, each with another REC_TIME seconds field in its
    header: distinct sha256 (so each is processed), the same pixels (the same work)."""
    folder.mkdir(parents=True)
    out = []
    for p in sorted((DATA / "sxm").glob("*.sxm")):
        data = p.read_bytes()
        i = data.find(b":REC_TIME:\n")
        if i < 0:
            continue
        j = i + len(b":REC_TIME:\n") + 6  # hh:mm:SS -> the seconds
        for k in range(copies):
            q = folder / f"{p.stem}_copy{k}.sxm"
            q.write_bytes(data[:j] + f"{k:02d}".encode() + data[j + 2:])
            out.append(q)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--with-images", action="store_true")
    ap.add_argument("--copies", type=int, default=0, help="Instead of the shared folder, an archive of N "
                    "copies of each good scan (header time changed: distinct sha256, same pixels).")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        refs = tmp / "refs"
        make_refs(refs)
        inputs = [DATA / "sxm"]
        files = sorted((DATA / "sxm").rglob("*.sxm"))
        if a.copies:
            files = make_archive(tmp / "archive", a.copies)
            inputs = [tmp / "archive"]
        px = None
        if a.with_images:
            inputs.append(DATA / "labelled" / "wse2_defects")
            px = 0.1
        print(f"load before: {os.getloadavg()}; {len(files)} .sxm files{' (copies)' if a.copies else ''}"
              + (" + 27 wse2 JPGs" if a.with_images else ""))
        cfg = cfg_for(tmp, refs)
        rates: dict[str, list[float]] = {}
        steady: dict[str, list[float]] = {}
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        try:
            for r in range(a.repeats):
                if not a.with_images:
                    rates.setdefault("daemon (serial, in process)", []).append(
                        daemon_rate(files, tmp / f"d{r}", refs, px))
                for label, kw in [("batch --workers 0 (serial)", {"workers": 0}),
                                  ("batch --workers 1", {"workers": 1}),
                                  ("batch --workers 2", {"workers": 2}),
                                  ("batch --dask (LocalCluster, 2 workers)", {"dask_address": cluster.scheduler_address})]:
                    out = tmp / f"out_{r}_{len(rates)}_{label.split()[1]}"
                    stamps: list[float] = []
                    t0 = time.perf_counter()
                    rep = run_batch(inputs, out, cfg, pixel_size_nm=px,
                                    on_progress=lambda *_: stamps.append(time.perf_counter()), **kw)
                    dt = time.perf_counter() - t0
                    rates.setdefault(label, []).append(rep.processed / dt)
                    # start-up: time to the first recorded result (spawned workers import and load the library)
                    steady.setdefault(label, []).append(stamps[0] - t0)
        finally:
            cluster.close()
        base_key = "daemon (serial, in process)" if not a.with_images else "batch --workers 0 (serial)"
        base = statistics.median(rates[base_key])
        print(f"{'':42s} {'frames/s':>9s} {'x ' + base_key.split()[0]:>9s} {'first result after (s)':>23s}")
        for k, v in rates.items():
            m = statistics.median(v)
            st = f"{statistics.median(steady[k]):.2f}" if k in steady else "-"
            print(f"{k:42s} {m:9.2f} {m / base:9.2f} {st:>23s}")
        print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
