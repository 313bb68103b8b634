"""Delivery under stress: kill -9, SIGTERM, a full disk, two agents, big payloads (issue 15).

    python scripts/chaos_delivery.py kill --rounds 50            # folder + acknowledged feed, kill -9
    python scripts/chaos_delivery.py kill --rounds 20 --pubsub   # folder + PUB/SUB feed: the loss figure
    python scripts/chaos_delivery.py sigterm --frames 300        # SIGTERM during a burst (PUB/SUB and ack)
    python scripts/chaos_delivery.py diskfull                    # store and spool on a small tmpfs (root)
    python scripts/chaos_delivery.py twoagents
    python scripts/chaos_delivery.py memory --payload-mb 100 --n 10 --big-mb 600

Real agent processes (the same code as ``stm-agent run``), real sockets on 127.0.0.1, real scans
from ../shared/data/sxm made distinct (``make_unique_sxm``); everything under a temporary folder.
Prints figures; not a test (they depend on the machine: run under ``nice`` and note ``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SXM = REPO.parent / "shared" / "data" / "sxm"
SCANS = ("porphyrin_dimer_96_up_7ch.sxm", "hbn_point_defect_96x100_down.sxm", "moire_10nm_160_down.sxm")

from stm_agent.adapters.references import ReferenceLibrary  # noqa: E402
from stm_agent.adapters.replay import ReplayFeed, make_unique_sxm  # noqa: E402
from stm_agent.adapters.scanfile import read_scan  # noqa: E402
from stm_agent.adapters.store import ResultStore  # noqa: E402
from stm_agent.adapters.zmq_io import Subscriber  # noqa: E402
from stm_agent.agent.config import AgentConfig  # noqa: E402
from stm_agent.agent.pipeline import detect, reference_crop_at  # noqa: E402

# The agent; STM_CHAOS_SLOW_MS adds that much to every frame (so that kills land mid-frame).
AGENT_CODE = (
    "import logging, os, sys, time\n"
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "from stm_agent.agent.config import AgentConfig\n"
    "from stm_agent.agent.daemon import Agent, install_signal_handlers\n"
    "from stm_agent.agent.pipeline import Recognizer\n"
    "cfg = AgentConfig.model_validate_json(open(sys.argv[1]).read())\n"
    "rec = Recognizer.from_config(cfg, allow_empty=True)\n"
    "slow = float(os.environ.get('STM_CHAOS_SLOW_MS', '0')) / 1000\n"
    "inner = rec.recognise\n"
    "rec.recognise = (lambda scan: (time.sleep(slow), inner(scan))[1]) if slow else inner\n"
    "a = Agent(cfg, recognizer=rec); install_signal_handlers(a); a.run()\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def make_refs(folder: Path) -> Path:
    scan = read_scan(SXM / "au111_adsorbates_10nm_256_up.sxm")
    cfg = AgentConfig()
    _, regions = detect(scan, cfg)
    reg = next(r for r in regions if not r.touches_edge)
    crop, px, prov = reference_crop_at(scan, *reg.centroid_px, cfg, units="px")
    ReferenceLibrary(folder).add("adsorbate", crop, px, prov)
    return folder


def base_cfg(work: Path, refs: Path, store_dir: Path | None = None) -> AgentConfig:
    store_dir = store_dir or work
    return AgentConfig(
        agent_id="chaos", references={"folder": str(refs)},
        acquisition={"folder": str(work / "acq"), "settle_s": 0.3, "complete_timeout_s": 60.0},
        results={"store": str(store_dir / "results.sqlite"), "out_dir": str(work / "out"), "write_overlay": False},
        publish={"endpoint": f"tcp://127.0.0.1:{free_port()}", "heartbeat_s": 0.5, "linger_ms": 500,
                 "query_endpoint": f"tcp://127.0.0.1:{free_port()}"},
    )


class Proc:
    def __init__(self, work: Path, cfg: AgentConfig, name: str):
        self.cfg_path = work / f"{name}.json"
        self.cfg_path.write_text(cfg.model_dump_json())
        self.log_path = work / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.p = subprocess.Popen([sys.executable, "-c", AGENT_CODE, str(self.cfg_path)], cwd=REPO,
                                  stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_heartbeat(endpoint: str, proc: Proc, timeout: float = 120.0) -> bool:
    with Subscriber(endpoint, ["agent.heartbeat"]) as sub:
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.p.poll() is None:
            if sub.recv(timeout_ms=200):
                return True
    return False


def feed_folder(work: Path) -> Path:
    d = work / "feed"
    d.mkdir(exist_ok=True)
    for n in SCANS:
        shutil.copy(SXM / n, d / n)
    return d


def store_state(path: Path) -> tuple[set[str], set[str], list[int]]:
    with ResultStore(path) as s, s._lock:
        done = {r[0] for r in s._db.execute("SELECT frame_id FROM frames")}
        store_state.errors = [r[0] for r in s._db.execute("SELECT reason FROM frames WHERE status = 'error'")]
        waiting = {r[0] for r in s._db.execute("SELECT frame_id FROM inbox")}
        fseq = [r[0] for r in s._db.execute("SELECT frame_seq FROM frames ORDER BY frame_seq")]
    return done, waiting, fseq


class Collector:
    """Subscribes to frame.counts for the whole run (across agent restarts)."""

    def __init__(self, endpoint: str):
        self.msgs: list[dict] = []
        self._stop = threading.Event()
        self._sub = Subscriber(endpoint, ["frame.counts"])
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._sub.recv(timeout_ms=100)
            if got:
                self.msgs.append(got[1])

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._sub.close()


# ----------------------------------------------------------------------------- kill -9 rounds
def cmd_kill(a: argparse.Namespace) -> None:
    os.environ["STM_CHAOS_SLOW_MS"] = str(a.slow_ms)
    work = Path(tempfile.mkdtemp(prefix="chaos-kill-"))
    refs = make_refs(work / "refs")
    (work / "acq").mkdir()
    cfg = base_cfg(work, refs)
    feed = ReplayFeed(feed_folder(work), "tcp://127.0.0.1:*", mode="sxm", interval_s=a.feed_interval,
                      count=a.feed_frames, unique=True, ack=not a.pubsub, window=8, ack_timeout_s=3.0,
                      send_timeout_s=600.0, sndhwm=100)
    cfg.controller.enabled, cfg.controller.endpoint, cfg.controller.ack = True, feed.endpoint, not a.pubsub
    rng = random.Random(a.seed)
    coll = Collector(cfg.publish.endpoint)
    folder_ids: set[str] = set()
    stop_folder = threading.Event()
    sent: list = []

    def drop_folder_files() -> None:
        datas = [(SXM / n).read_bytes() for n in SCANS]
        i = 0
        while not stop_folder.is_set() and i < a.folder_frames:
            data = make_unique_sxm(datas[i % len(datas)], 100000 + i)
            import hashlib

            folder_ids.add(hashlib.sha256(data).hexdigest())
            tmp = work / f"f{i:04d}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, work / "acq" / f"f{i:04d}.sxm")
            i += 1
            stop_folder.wait(a.folder_interval)

    feeder = threading.Thread(target=lambda: sent.extend(feed.run()), daemon=True)
    folder_thread = threading.Thread(target=drop_folder_files, daemon=True)
    kills_mid_frame = 0
    t0 = time.monotonic()
    proc = Proc(work, cfg, "agent0")
    try:
        if not wait_heartbeat(cfg.publish.endpoint, proc):
            raise SystemExit("agent did not start:\n" + proc.log()[-3000:])
        feed.wait_for_subscriber(30)
        feeder.start()
        folder_thread.start()
        for r in range(a.rounds):
            time.sleep(rng.uniform(0.2, a.max_run_s))
            proc.p.send_signal(signal.SIGKILL)
            proc.p.wait(10)
            with ResultStore(cfg.results.store) as s, s._lock:
                kills_mid_frame += s._db.execute("SELECT COUNT(*) FROM inbox WHERE attempts > 0").fetchone()[0] > 0
            proc = Proc(work, cfg, f"agent{r + 1}")
            if not wait_heartbeat(cfg.publish.endpoint, proc):
                raise SystemExit("agent did not restart:\n" + proc.log()[-3000:])
            print(f"round {r + 1}: killed; {len(sent)} feed frames sent, {len(folder_ids)} folder files, "
                  f"{len(coll.msgs)} frame.counts seen", flush=True)
        stop_folder.set()
        folder_thread.join(30)
        feeder.join(600)
        # let the last agent finish everything
        end = time.monotonic() + 600
        while time.monotonic() < end:
            done, waiting, _ = store_state(cfg.results.store)
            if not waiting and (folder_ids | {s.frame_id for s in sent}) <= done | waiting:
                break
            if a.pubsub and not waiting and folder_ids <= done:
                break
            time.sleep(0.5)
        time.sleep(2.0)
        proc.p.send_signal(signal.SIGTERM)
        rc = proc.p.wait(60)
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
        coll.close()
        feed.close()
    elapsed = time.monotonic() - t0
    done, waiting, fseq = store_state(cfg.results.store)
    feed_ids = {s.frame_id for s in sent}
    first_time = [m["frame_id"] for m in coll.msgs if not m.get("redelivered")]
    dup_new = len(first_time) - len(set(first_time))
    seen_seq = {m.get("frame_seq") for m in coll.msgs}
    with ResultStore(cfg.results.store) as s:
        recoverable: list[int] = []
        n = 0
        while True:
            rows = s.since(n)
            if not rows:
                break
            recoverable += [r["frame_seq"] for r in rows]
            n = rows[-1]["frame_seq"]
    print(json.dumps({
        "mode": "pubsub" if a.pubsub else "ack", "rounds": a.rounds, "slow_ms": a.slow_ms, "elapsed_s": round(elapsed, 1),
        "final_exit": rc, "kills_with_a_frame_in_progress": kills_mid_frame,
        "folder": {"dropped": len(folder_ids), "recorded": len(folder_ids & done), "lost": len(folder_ids - done)},
        "feed": {"sent": len(feed_ids), "recorded": len(feed_ids & done), "lost": len(feed_ids - done - waiting),
                 "resent_by_controller": feed.resent if not a.pubsub else None},
        "waiting_at_end": len(waiting), "recorded": len(done), "recorded_as_error": len(store_state.errors),
        "error_reasons": sorted(set(e[:80] for e in store_state.errors)),
        "frame_seq_gap_free": fseq == list(range(1, len(fseq) + 1)),
        "frame.counts_seen": len(coll.msgs), "duplicated_as_new": dup_new,
        "frames_seen_live": len(seen_seq & set(fseq)), "frames_only_recoverable_by_since": len(set(fseq) - seen_seq),
        "recoverable_by_since": len(recoverable) == len(fseq),
        "work": str(work),
    }, indent=1))


# ----------------------------------------------------------------------------- SIGTERM burst
def _stop_line(log: str) -> dict:
    m = re.search(r"controller feed: stopped \(.*?\): (\d+) received, (\d+) submitted, (\d+) duplicates, "
                  r"(\d+) not written", log)
    return dict(zip(("received", "submitted", "duplicates", "not_written"), map(int, m.groups()))) if m else {}


def cmd_sigterm(a: argparse.Namespace) -> None:
    for ack in (False, True):
        work = Path(tempfile.mkdtemp(prefix="chaos-term-"))
        refs = make_refs(work / "refs")
        cfg = base_cfg(work, refs)
        cfg.acquisition.enabled = False
        feed = ReplayFeed(feed_folder(work), "tcp://127.0.0.1:*", mode="sxm", interval_s=0.0, count=a.frames,
                          unique=True, ack=ack, window=16, sndhwm=50, send_timeout_s=120.0 if ack else 5.0)
        cfg.controller.enabled, cfg.controller.endpoint, cfg.controller.ack = True, feed.endpoint, ack
        proc = Proc(work, cfg, "agent")
        sent: list = []
        wait_heartbeat(cfg.publish.endpoint, proc)
        feed.wait_for_subscriber(30)
        t = threading.Thread(target=lambda: sent.extend(feed.run()), daemon=True)
        t.start()
        with ResultStore(cfg.results.store) as s:
            while s.pending_count() + s.count() < a.frames // 3:
                time.sleep(0.02)
        t_term = time.monotonic()
        proc.p.send_signal(signal.SIGTERM)
        rc = proc.p.wait(120)
        stop_s = time.monotonic() - t_term
        stats = _stop_line(proc.log())
        done, waiting, _ = store_state(cfg.results.store)
        out = {"mode": "ack" if ack else "pubsub", "frames": a.frames, "exit": rc, "stop_s": round(stop_s, 2),
               **stats, "on_disk": len(done | waiting), "recorded": len(done), "waiting": len(waiting),
               "received_but_lost": stats.get("received", -1) - len(done | waiting)}
        if ack:  # restart: the controller sends again what was not acknowledged
            proc2 = Proc(work, cfg, "agent2")
            t.join(300)
            end = time.monotonic() + 300
            while time.monotonic() < end:
                done, waiting, _ = store_state(cfg.results.store)
                if {x.frame_id for x in sent} <= done and not waiting:
                    break
                time.sleep(0.5)
            proc2.p.send_signal(signal.SIGTERM)
            proc2.p.wait(60)
            done, waiting, _ = store_state(cfg.results.store)
            out.update({"after_restart_recorded": len(done), "sent": len(sent),
                        "lost_after_restart": len({x.frame_id for x in sent} - done), "resent": feed.resent})
        else:
            t.join(60)
            out.update({"sent": len(sent), "sent_not_received": len(sent) - stats.get("received", 0)})
        feed.close()
        print(json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- full disk
def cmd_diskfull(a: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="chaos-full-"))
    refs = make_refs(work / "refs")
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.disk_mb}m", "tmpfs", str(disk)], check=True)
    try:
        cfg = base_cfg(work, refs, store_dir=disk)
        cfg.acquisition.enabled = False
        cfg.results.out_dir = disk / "out"
        if a.store_only:  # only the SQLite store on the small disk: the inbox and the worker's record fail
            cfg.results.spool_dir = work / "spool"
            cfg.results.out_dir = work / "out"
        feed = ReplayFeed(feed_folder(work), "tcp://127.0.0.1:*", mode="sxm", interval_s=0.02, count=a.frames,
                          unique=True, sndhwm=10, send_timeout_s=600.0)
        cfg.controller.enabled, cfg.controller.endpoint = True, feed.endpoint
        proc = Proc(work, cfg, "agent")
        wait_heartbeat(cfg.publish.endpoint, proc)
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        with open(filler, "wb") as f:  # leave room for a few frames
            f.write(b"\0" * max(free - int(a.room_mb * (1 << 20)), 0))
        print(f"tmpfs {a.disk_mb} MB, {shutil.disk_usage(disk).free / 1e6:.1f} MB free after the filler", flush=True)
        sent: list = []
        feed.wait_for_subscriber(30)
        t = threading.Thread(target=lambda: sent.extend(feed.run()), daemon=True)
        t.start()
        time.sleep(a.full_s)  # the disk is full for this long (frames keep coming)
        log_full = proc.log()
        errors_while_full = sum(1 for line in log_full.splitlines() if " ERROR " in line)
        filler.unlink()
        t.join(600)
        end = time.monotonic() + 600
        while time.monotonic() < end:
            done, waiting, _ = store_state(cfg.results.store)
            if {x.frame_id for x in sent} <= done and not waiting:
                break
            time.sleep(0.5)
        proc.p.send_signal(signal.SIGTERM)
        rc = proc.p.wait(60)
        stats = _stop_line(proc.log())
        done, waiting, _ = store_state(cfg.results.store)
        full_lines = [line for line in log_full.splitlines() if " ERROR " in line]
        print(json.dumps({"disk_mb": a.disk_mb, "room_mb": a.room_mb, "store_only": a.store_only,
                          "frames": a.frames, "sent": len(sent), "exit": rc, **stats, "recorded": len(done),
                          "waiting": len(waiting), "lost": len({x.frame_id for x in sent} - done - waiting),
                          "full_for_s": a.full_s, "error_lines_while_full": errors_while_full,
                          "error_lines": [x[24:260] for x in full_lines]}, indent=1))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ----------------------------------------------------------------------------- two agents
def cmd_twoagents(a: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="chaos-two-"))
    refs = make_refs(work / "refs")
    cfg = base_cfg(work, refs)
    first = Proc(work, cfg, "first")
    wait_heartbeat(cfg.publish.endpoint, first)
    second = cfg.model_copy(deep=True)
    second.publish.endpoint = f"tcp://127.0.0.1:{free_port()}"
    second.publish.query_endpoint = None
    (work / "second.yaml").write_text(json.dumps(second.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "stm_agent.agent.cli", "run", "--config", str(work / "second.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    first.p.send_signal(signal.SIGTERM)
    print(json.dumps({"second_exit": out.returncode, "second_says": " ".join((out.stdout + out.stderr).split())[-300:],
                      "first_exit": first.p.wait(60)}, indent=1))


# ----------------------------------------------------------------------------- memory
def cmd_memory(a: argparse.Namespace) -> None:
    import zmq

    work = Path(tempfile.mkdtemp(prefix="chaos-mem-"))
    refs = make_refs(work / "refs")
    cfg = base_cfg(work, refs)
    cfg.acquisition.enabled = False
    cfg.results.keep_received = False
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.SNDHWM, 1000)
    pub.bind("tcp://127.0.0.1:*")
    cfg.controller.enabled, cfg.controller.endpoint = True, pub.getsockopt_string(zmq.LAST_ENDPOINT)
    proc = Proc(work, cfg, "agent")
    wait_heartbeat(cfg.publish.endpoint, proc)
    for _ in cfg.controller.topics:
        pub.poll(10000)
        pub.recv()
    base = vm_hwm_mb(proc.p.pid)
    t0 = time.monotonic()
    for i in range(a.n):
        body = os.urandom(64) + bytes(a.payload_mb * (1 << 20) - 64)
        pub.send_multipart([b"scan.sxm", json.dumps({"name": f"big{i}"}).encode(), body])
    with ResultStore(cfg.results.store) as s:
        while s.count() < a.n and time.monotonic() - t0 < 600:
            time.sleep(0.2)
    after_n = vm_hwm_mb(proc.p.pid)
    big = bytes(a.big_mb * (1 << 20))
    pub.send_multipart([b"scan.sxm", b'{"name": "too big"}', big])
    del big
    pub.send_multipart([b"scan.sxm", b'{"name": "after"}', os.urandom(1000)])
    with ResultStore(cfg.results.store) as s:
        while s.count() < a.n + 1 and time.monotonic() - t0 < 900:
            time.sleep(0.2)
    after_big = vm_hwm_mb(proc.p.pid)
    proc.p.send_signal(signal.SIGTERM)
    proc.p.wait(60)
    pub.close(linger=0)
    ctx.term()
    log = proc.log()
    print(json.dumps({"payload_mb": a.payload_mb, "n": a.n, "rcvhwm": re.search(r"RCVHWM (\d+)", log).group(1),
                      "peak_rss_mb_at_start": round(base), "peak_rss_mb_after_n": round(after_n),
                      "big_mb": a.big_mb, "peak_rss_mb_after_big": round(after_big),
                      "big_rejected": "payload_too_large" in log, "next_frame_recorded": "after" in log,
                      "elapsed_s": round(time.monotonic() - t0, 1)}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kill")
    k.add_argument("--rounds", type=int, default=50)
    k.add_argument("--pubsub", action="store_true")
    k.add_argument("--feed-frames", type=int, default=200)
    k.add_argument("--feed-interval", type=float, default=0.6)
    k.add_argument("--folder-frames", type=int, default=120)
    k.add_argument("--folder-interval", type=float, default=1.0)
    k.add_argument("--slow-ms", type=float, default=300.0, help="added to every frame's processing")
    k.add_argument("--max-run-s", type=float, default=2.5)
    k.add_argument("--seed", type=int, default=15)
    s = sub.add_parser("sigterm")
    s.add_argument("--frames", type=int, default=300)
    d = sub.add_parser("diskfull")
    d.add_argument("--disk-mb", type=int, default=64)
    d.add_argument("--room-mb", type=float, default=6)
    d.add_argument("--frames", type=int, default=40)
    d.add_argument("--full-s", type=float, default=20.0)
    d.add_argument("--store-only", action="store_true", help="spool and result files elsewhere")
    sub.add_parser("twoagents")
    m = sub.add_parser("memory")
    m.add_argument("--payload-mb", type=int, default=100)
    m.add_argument("--n", type=int, default=10)
    m.add_argument("--big-mb", type=int, default=600)
    a = ap.parse_args()
    print(f"uptime: {os.getloadavg()}", flush=True)
    {"kill": cmd_kill, "sigterm": cmd_sigterm, "diskfull": cmd_diskfull, "twoagents": cmd_twoagents,
     "memory": cmd_memory}[a.cmd](a)


if __name__ == "__main__":
    main()
