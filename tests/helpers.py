"""What several test modules share that is not a fixture (fixtures are in conftest.py): the names
of the real scans they use, a real agent running in a thread, the configuration of a test agent
(everything it writes goes under the test's own folder), a reference library picked from a real
scan.

Real data: ../shared/data/sxm, read only; tests copy what an agent should pick up into tmp_path.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from stm_agent.adapters.arrival import Arrival
from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.scanfile import read_scan
from stm_agent.adapters.zmq_io import Subscriber
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.daemon import Agent
from stm_agent.agent.pipeline import detect, reference_crop_at
from stm_agent.models.pixel import PixelEncoder

REF_SCAN = "au111_adsorbates_10nm_256_up.sxm"  # the scan the test reference is picked from
OTHER = "cu111_tcne_molecules_6nm_256_up.sxm"
SMALL = "porphyrin_dimer_96_up_7ch.sxm"
BAD = "bad/not_an_sxm.sxm"


def sha(path: Path) -> str:
    """sha256 (hex) of a file: its frame_id."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def free_port() -> int:
    """A TCP port free right now (prefer binding ``tcp://127.0.0.1:*`` where the code allows it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``pred()`` until it is true or ``timeout`` s have passed; the final value of ``pred()``.
    (Waiting on a condition, not a fixed sleep: fast when it happens early, bounded when it never does.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def wait_connected(sub: Subscriber, timeout: float = 10.0) -> bool:
    """Wait until ``sub`` has completed its ZeroMQ handshake with a bound publisher (socket monitor
    event), instead of sleeping and hoping: messages published from then on reach it."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    mon = sub._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if mon.poll(100) and recv_monitor_message(mon)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
        return False
    finally:
        sub._sock.disable_monitor()
        mon.close(linger=0)


def build_refs(sxm_dir: Path, folder: Path) -> Path:
    """One-species library in ``folder``: the first whole adsorbate of the Au(111) scan."""
    scan = read_scan(sxm_dir / REF_SCAN)
    cfg = AgentConfig()
    _, regions = detect(scan, cfg)
    reg = next(r for r in regions if not r.touches_edge)
    crop, px, prov = reference_crop_at(scan, *reg.centroid_px, cfg, units="px")
    ReferenceLibrary(folder).add("adsorbate", crop, px, prov)
    return folder


def make_cfg(tmp_path: Path, refs: Path, *, results_next_to_scans: bool = False, **acq) -> AgentConfig:
    """A test agent: watches ``tmp_path/acq``, records in ``tmp_path/results.sqlite``, publishes on a
    free port, heartbeat every 0.2 s, no query endpoint. Result files (JSON + PNG) go to
    ``tmp_path/out`` unless ``results_next_to_scans`` (the default of a real agent): never next to
    a scan in ../shared. ``acq`` overrides acquisition settings."""
    return AgentConfig(
        agent_id="stm-test",
        references={"folder": str(refs)},
        acquisition={"folder": str(tmp_path / "acq"), "settle_s": 0.3, "complete_timeout_s": 30.0} | acq,
        results={"store": str(tmp_path / "results.sqlite"),
                 "out_dir": None if results_next_to_scans else str(tmp_path / "out")},
        publish={"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.2, "linger_ms": 500,
                 "query_endpoint": None},
    )


class Running:
    """An Agent running in a thread, with a SUB socket that has joined (seen a heartbeat)."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.sub = Subscriber(agent.endpoint)
        self.log: list[tuple[str, dict]] = []  # every message received, in order
        self.thread = threading.Thread(target=agent.run, daemon=True)
        self.thread.start()
        self.next("agent.heartbeat", timeout=10)  # slow joiner: from here on nothing is missed

    def next(self, topic: str, timeout: float = 10.0, where=lambda m: True) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.sub.recv(timeout_ms=100)
            if got:
                self.log.append(got)
                if got[0] == topic and where(got[1]):
                    return got[1]
        pytest.fail(f"no {topic} message within {timeout} s")

    def frames(self, wait: float, since: int = 0) -> list[dict]:
        """frame.counts messages received from log position ``since`` on, after waiting ``wait`` s."""
        end = time.monotonic() + wait
        while time.monotonic() < end:
            got = self.sub.recv(timeout_ms=50)
            if got:
                self.log.append(got)
        return [m for t, m in self.log[since:] if t == "frame.counts"]

    def idle(self, timeout: float = 10.0) -> dict:
        """Wait for a heartbeat with nothing pending or queued."""
        return self.next("agent.heartbeat", timeout,
                         where=lambda m: m["pending"] == 0 and m["queue_depth"] == 0)

    def stop(self) -> dict:
        self.agent.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        msg = self.next("agent.status", 5, where=lambda m: m["state"] == "stopping")
        self.sub.close()
        return msg


def run_real_agent(work: Path, sxm_dir: Path, files: list[str], timeout: float = 90.0, during=None) -> dict:
    """Run the real Agent in a thread on ``files`` (relative to sxm_dir) copied into its watched
    folder; return every message received ({"log": [(topic, msg)], "store": Path, "cfg", "agent",
    "during": what ``during(agent)`` returned}).

    Waits for a heartbeat first (slow joiner), then for one frame.counts per file, then for one
    more heartbeat, calls ``during(agent)`` (agent still running), then stops the agent and
    collects the agent.status "stopping"."""
    cfg = make_cfg(work, build_refs(sxm_dir, work / "refs"), complete_timeout_s=5.0)
    cfg.publish.query_endpoint = "tcp://127.0.0.1:*"
    agent = Agent(cfg)
    sub = Subscriber(agent.endpoint)
    log: list[tuple[str, dict]] = []
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    def wait(pred, what: str, limit: float) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            got = sub.recv(timeout_ms=100)
            if got:
                log.append(got)
                if pred(got):
                    return
        pytest.fail(f"real agent: no {what} within {limit} s; got {[t for t, _ in log]}")

    try:
        wait(lambda g: g[0] == "agent.heartbeat", "heartbeat", 20)
        (work / "acq").mkdir(exist_ok=True)
        for f in files:
            shutil.copy(sxm_dir / f, work / "acq" / Path(f).name)
        end = time.monotonic() + timeout
        while sum(t == "frame.counts" for t, _ in log) < len(files):
            wait(lambda g: g[0] == "frame.counts", "frame.counts", max(end - time.monotonic(), 0.1))
        mark = len(log)
        wait(lambda g: g[0] == "agent.heartbeat" and len(log) > mark, "heartbeat after the frames", 10)
        result = during(agent) if during is not None else None
        agent.stop()
        thread.join(20)
        assert not thread.is_alive(), "the agent did not stop"
        wait(lambda g: g[0] == "agent.status" and g[1].get("state") == "stopping", "agent.status stopping", 5)
    finally:
        agent.stop()
        thread.join(10)
        sub.close()
    return {"log": log, "store": Path(cfg.results.store), "cfg": cfg, "agent": agent, "during": result}


def arrival(path: Path, *, source: str = "folder", payload: bool = False) -> Arrival:
    data = path.read_bytes()
    return Arrival(path=None if payload else path, frame_id=hashlib.sha256(data).hexdigest(), size=len(data),
                   received_at=datetime.now(timezone.utc), received_mono=time.monotonic(), source=source,
                   kind="sxm" if payload else "file", payload=data if payload else None,
                   meta={"name": path.name} if payload else {})


class CountingEncoder(PixelEncoder):
    """Pixel encoder that counts how many crops it embedded."""

    def __init__(self, size_px: int, tag: str = ""):
        super().__init__(size_px)
        self.id += tag
        self.n = 0

    def embed(self, crops):
        self.n += len(crops)
        return super().embed(crops)


def agent_session(tmp: Path, scans: list[Path], **overrides) -> tuple[AgentConfig, Agent, list[dict]]:
    """Run an in-process agent on ``tmp`` (acquisition, store, references under it), copy ``scans``
    into its folder one by one, wait for each frame.counts, stop it.

    ``overrides`` are merged into the config (e.g. ``bluesky={...}``, ``triggers=[...]``).
    Returns the config, the stopped agent and the frame.counts messages, in scan order.
    """
    from stm_agent.agent.config import load_config

    cfg = load_config(overrides={
        "references": {"folder": str(tmp / "refs")},
        "acquisition": {"folder": str(tmp / "acq"), "settle_s": 0.3},
        "results": {"store": str(tmp / "results.sqlite")},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.2, "query_endpoint": None},
        **overrides,
    })
    agent = Agent(cfg)
    sub = Subscriber(agent.endpoint, ["frame.counts", "agent.heartbeat"])
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    msgs = []
    try:
        end = time.monotonic() + 10
        while (got := sub.recv(timeout_ms=100)) is None or got[0] != "agent.heartbeat":
            assert time.monotonic() < end, "the agent sent no heartbeat"
        for src in scans:
            shutil.copy(src, tmp / "acq" / src.name)
            end = time.monotonic() + 30
            while True:
                assert time.monotonic() < end, f"no frame.counts for {src.name}"
                got = sub.recv(timeout_ms=100)
                if got and got[0] == "frame.counts" and got[1]["name"] == src.name:
                    msgs.append(got[1])
                    break
    finally:
        agent.stop()
        th.join(20)
        sub.close()
    return cfg, agent, msgs
