"""Latency of the dashboard: ``frame.counts`` published -> page updated, over N frames at R Hz.

    nice -n 10 python scripts/bench_dashboard.py                 # 100 frames at 2 Hz (about 1 min)
    nice -n 10 python scripts/bench_dashboard.py --frames 40 --browsers 3

The agent runs as `stm-agent run` in its own process with its dashboard on (controller source on,
one reference species picked from a real scan). This process plays the controller (real scans,
every frame distinct content), subscribes to the agent's PUB socket (the moment ``frame.counts``
arrives there = published, local TCP) and opens the page in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright). The page notes, per live frame, the moment the frame's
image has loaded and its overlay, counts, table and time series are drawn
(``window.stmDash.rendered``, epoch ms, same clock). Printed: p50 / p95 / max of the difference,
frames missing on the page. Not a test: figures depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from stm_agent.adapters.references import ReferenceLibrary  # noqa: E402
from stm_agent.adapters.replay import ReplayFeed  # noqa: E402
from stm_agent.adapters.scanfile import read_scan  # noqa: E402
from stm_agent.adapters.zmq_io import Subscriber  # noqa: E402
from stm_agent.agent.config import AgentConfig  # noqa: E402
from stm_agent.agent.pipeline import detect, reference_crop_at  # noqa: E402

SXM = REPO.parent / "shared" / "data" / "sxm"
FILES = ("au111_adsorbates_10nm_256_up.sxm", "cu111_tcne_molecules_6nm_256_up.sxm",
         "graphene_tcne_monolayer_4nm_256_down.sxm", "porphyrin_dimer_96_up_7ch.sxm")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--rate", type=float, default=2.0, help="frames per second sent")
    ap.add_argument("--browsers", type=int, default=1, help="pages open at once (each is measured)")
    args = ap.parse_args()
    if not SXM.is_dir():
        sys.exit(f"{SXM}: missing; the benchmark replays the real scans of ../shared/data/sxm")
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="stm-agent-dash-"))
    feed_dir = work / "feed"
    feed_dir.mkdir()
    for name in FILES:
        shutil.copy(SXM / name, feed_dir / name)
    cfg = AgentConfig()
    scan = read_scan(SXM / FILES[0])
    _, regions = detect(scan, cfg)
    reg = next(r for r in regions if not r.touches_edge)
    crop, px, prov = reference_crop_at(scan, *reg.centroid_px, cfg, units="px")
    ReferenceLibrary(work / "refs").add("adsorbate", crop, px, prov)

    feed_ep, pub_ep, port = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    import yaml

    (work / "agent.yaml").write_text(yaml.safe_dump({
        "agent_id": "dash-bench",
        "acquisition": {"enabled": False},
        "controller": {"enabled": True, "endpoint": feed_ep},
        "publish": {"endpoint": pub_ep, "heartbeat_s": 1.0, "query_endpoint": None},
        "results": {"store": str(work / "results.sqlite"), "out_dir": str(work / "out"), "write_overlay": False,
                    "keep_received": True},
        "references": {"folder": str(work / "refs")},
        "dashboard": {"enabled": True, "port": port, "keep_images": 200},
    }))
    feed = ReplayFeed(feed_dir, feed_ep, interval_s=1.0 / args.rate, count=args.frames, unique=True)
    sub = Subscriber(pub_ep, ["frame.counts"])
    exe = Path(sys.executable).with_name("stm-agent")
    proc = subprocess.Popen([str(exe), "run", "--config", str(work / "agent.yaml")], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=open(work / "agent.log", "wb"))
    published: dict[str, float] = {}
    page_log: list[str] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            got = sub.recv(timeout_ms=100)
            if got and got[1]["frame_id"] not in published:
                published[got[1]["frame_id"]] = time.time() * 1000.0

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    load0 = os.getloadavg()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            url = f"http://127.0.0.1:{port}/"
            end = time.monotonic() + 60
            pages = []
            while len(pages) < args.browsers:
                try:
                    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
                    pg.on("console", lambda m: m.type in ("error", "warning") and page_log.append(m.text))
                    pg.on("pageerror", lambda e: page_log.append(str(e)))
                    pg.goto(url)
                    pg.wait_for_function("window.stmDash.ready", timeout=20_000)
                    pages.append(pg)
                except Exception:  # noqa: BLE001 - the agent (and its dashboard) is still starting
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.5)
            if not feed.wait_for_subscriber(60):
                sys.exit(f"the agent did not subscribe to the feed within 60 s; see {work / 'agent.log'}")
            time.sleep(1.0)
            print(f"replaying {args.frames} frames at {args.rate:g} Hz into pid {proc.pid}, "
                  f"{args.browsers} page(s) open ...", flush=True)
            sent = feed.run()
            want = {s.frame_id for s in sent}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not want <= set(published):
                time.sleep(0.2)
            time.sleep(2.0)
            rendered = [{r["frame_id"]: r["t"] for r in pg.evaluate("window.stmDash.rendered")} for pg in pages]
            browser.close()
    finally:
        load1 = os.getloadavg()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop.set()
        listener.join(2)
        feed.close()
        sub.close()
    print(f"sent {len(sent)} frames; published {len(want & set(published))}")
    for i, r in enumerate(rendered):
        lat = np.array([r[f] - published[f] for f in want if f in r and f in published])
        missing = len([f for f in want if f in published and f not in r])
        if len(lat):
            print(f"page {i + 1}: published -> page updated over {len(lat)} frames: p50 {np.percentile(lat, 50):.0f} ms, "
                  f"p95 {np.percentile(lat, 95):.0f} ms, max {lat.max():.0f} ms; missing on the page {missing}")
        else:
            print(f"page {i + 1}: no frame rendered; missing {missing}")
    if page_log:
        print(f"page console errors ({len(page_log)}): {page_log[:5]}")
    lost = [i for i, s in enumerate(sent) if s.frame_id in published and any(s.frame_id not in r for r in rendered)]
    if lost:
        print(f"frames published but not rendered: indices {lost}; agent log kept in {work / 'agent.log'}")
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; cpu cores {os.cpu_count()}; work folder {work}")
    if not lost:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
