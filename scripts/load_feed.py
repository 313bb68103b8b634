"""Load test: replay N real scans at R Hz through the controller feed into a real agent process.

    python scripts/load_feed.py                      # 1,000 frames at 10 Hz (about 2 min)
    python scripts/load_feed.py --frames 200 --rate 20 --mode array

The agent runs as `stm-agent run` in its own process (controller source on, folder source off,
one reference species picked from a real scan), exactly as in production. This process plays
the controller (:class:`adapters.replay.ReplayFeed`, every frame made distinct content so that
none is de-duplicated) and subscribes to the agent's messages. Printed: frames sent / published /
recorded / lost, sustained frames/s, latency from the controller's send to the agent's
``frame.counts`` (p50, p95, max), the deepest inbox queue seen in the heartbeats, and the agent's
peak RSS (VmHWM of its process). Not a test: figures depend on the machine.
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
from stm_agent.adapters.store import ResultStore  # noqa: E402
from stm_agent.adapters.zmq_io import Subscriber  # noqa: E402
from stm_agent.agent.config import AgentConfig  # noqa: E402
from stm_agent.agent.pipeline import detect, reference_crop_at  # noqa: E402

SXM = REPO.parent / "shared" / "data" / "sxm"
DEFAULT_FILES = ("au111_adsorbates_10nm_256_up.sxm", "cu111_tcne_molecules_4nm_256_up.sxm",
                 "cu111_tcne_molecules_6nm_256_up.sxm", "graphene_tcne_monolayer_4nm_256_down.sxm",
                 "porphyrin_dimer_96_up_7ch.sxm", "si111_7x7_atoms_defects_20nm_256_down.sxm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a process, MB (Linux /proc VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10.0, help="frames per second sent")
    ap.add_argument("--mode", choices=("sxm", "array"), default="sxm")
    ap.add_argument("--files", nargs="*", default=list(DEFAULT_FILES), help="scan names in ../shared/data/sxm")
    ap.add_argument("--overlay", action="store_true", help="also write the overlay PNG of every frame")
    ap.add_argument("--drain-s", type=float, default=120.0, help="wait this long for the backlog after the last send")
    args = ap.parse_args()
    if not SXM.is_dir():
        sys.exit(f"{SXM}: missing; the load test replays the real scans of ../shared/data/sxm")

    work = Path(tempfile.mkdtemp(prefix="stm-agent-load-"))
    feed_dir = work / "feed"
    feed_dir.mkdir()
    for name in args.files:
        shutil.copy(SXM / name, feed_dir / name)

    # one reference: the first whole object of the Au(111) scan
    cfg = AgentConfig()
    scan = read_scan(SXM / "au111_adsorbates_10nm_256_up.sxm")
    _, regions = detect(scan, cfg)
    reg = next(r for r in regions if not r.touches_edge)
    crop, px, prov = reference_crop_at(scan, *reg.centroid_px, cfg, units="px")
    ReferenceLibrary(work / "refs").add("adsorbate", crop, px, prov)

    feed_ep = f"tcp://127.0.0.1:{free_port()}"
    pub_ep = f"tcp://127.0.0.1:{free_port()}"
    agent_cfg = {
        "agent_id": "load-test",
        "acquisition": {"enabled": False},
        "controller": {"enabled": True, "endpoint": feed_ep},
        "publish": {"endpoint": pub_ep, "heartbeat_s": 1.0, "query_endpoint": None},
        "results": {"store": str(work / "results.sqlite"), "out_dir": str(work / "out"),
                    "write_json": True, "write_overlay": bool(args.overlay), "keep_received": False},
        "references": {"folder": str(work / "refs")},
    }
    import yaml

    (work / "agent.yaml").write_text(yaml.safe_dump(agent_cfg))

    feed = ReplayFeed(feed_dir, feed_ep, mode=args.mode, interval_s=1.0 / args.rate, count=args.frames,
                      unique=True, sndhwm=1000)
    sub = Subscriber(pub_ep, ["frame.counts", "agent.heartbeat"])
    exe = Path(sys.executable).with_name("stm-agent")
    proc = subprocess.Popen([str(exe), "run", "--config", str(work / "agent.yaml")], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=open(work / "agent.log", "wb"))
    received: dict[str, float] = {}
    statuses: dict[str, int] = {}
    max_queue = 0
    stop = threading.Event()

    def listen() -> None:
        nonlocal max_queue
        while not stop.is_set():
            got = sub.recv(timeout_ms=100)
            if not got:
                continue
            topic, msg = got
            if topic == "agent.heartbeat":
                max_queue = max(max_queue, int(msg.get("queue_depth") or 0))
            elif msg["frame_id"] not in received:
                received[msg["frame_id"]] = time.monotonic()
                statuses[msg["status"]] = statuses.get(msg["status"], 0) + 1

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        if not feed.wait_for_subscriber(60):
            sys.exit(f"the agent did not subscribe to the feed within 60 s; see {work / 'agent.log'}")
        time.sleep(0.5)  # our SUB on the agent's PUB has joined by now (heartbeats flow)
        print(f"replaying {args.frames} frames ({args.mode}, {len(args.files)} real scans, unique content) "
              f"at {args.rate:g} Hz into pid {proc.pid} ...", flush=True)
        t0 = time.monotonic()
        sent = feed.run()
        t_sent = time.monotonic() - t0
        deadline = time.monotonic() + args.drain_s
        want = {s.frame_id for s in sent}
        while time.monotonic() < deadline and not want <= set(received):
            time.sleep(0.2)
        rss = vm_hwm_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop.set()
        listener.join(2)
        feed.close()
        sub.close()

    lat = np.array([(received[s.frame_id] - s.sent_mono) * 1000.0 for s in sent if s.frame_id in received])
    lost = [s for s in sent if s.frame_id not in received]
    with ResultStore(work / "results.sqlite") as store:
        recorded = store.count()
        pending = store.pending_count()
    span = max(received.values()) - min(s.sent_mono for s in sent) if received else float("nan")
    print(f"sent                 {len(sent)} frames in {t_sent:.1f} s ({len(sent) / t_sent:.2f} Hz)")
    print(f"published            {len(received)} ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))})")
    print(f"recorded in store    {recorded} (still waiting: {pending})")
    print(f"lost                 {len(lost)}")
    print(f"sustained            {len(received) / span:.2f} frames/s (first send -> last publication)")
    if len(lat):
        print(f"latency send->pub    p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms, "
              f"max {lat.max():.0f} ms")
    print(f"deepest inbox queue  {max_queue} frames (heartbeats, 1 s apart)")
    print(f"agent peak RSS       {rss:.0f} MB")
    print(f"cpu cores            {os.cpu_count()}; work folder {work}")
    if not lost and pending == 0:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
