"""Delivery hardening (issue 15, findings 7-10, 13-15 and the controller port): one agent per
store, atomic seq, gap-free frame_seq with ``since``, nothing received is lost on SIGTERM / full
disk / kill -9 (acknowledged mode), bounded feed memory, bounded query and metrics servers,
rate-limited logs, spool retention, CURVE. Real agent processes, real sockets, real scans; every
file under tmp_path."""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from stm_agent.adapters.controller import ControllerSource, effective_rcvhwm
from stm_agent.adapters.query import GapFiller, QueryServer, query
from stm_agent.adapters.replay import ReplayFeed
from stm_agent.adapters.schemas import validate
from stm_agent.adapters.store import ResultStore
from stm_agent.adapters.zmq_io import Subscriber
from stm_agent.agent.config import AgentConfig, ControllerConfig
from stm_agent.agent.daemon import Agent
from stm_agent.agent.errors import PublishError, StoreError

from tests.helpers import REF_SCAN, SMALL, Running, arrival, free_port, make_cfg  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
FEED_SCANS = ["porphyrin_dimer_96_up_7ch.sxm", "hbn_point_defect_96x100_down.sxm", "moire_10nm_160_down.sxm"]

# The real agent in a process of its own (INFO log on stderr, which the tests read).
AGENT_CODE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
    "from stm_agent.agent.config import AgentConfig\n"
    "from stm_agent.agent.daemon import Agent, install_signal_handlers\n"
    "cfg = AgentConfig.model_validate_json(open(sys.argv[1]).read())\n"
    "a = Agent(cfg); install_signal_handlers(a); a.run()\n"
)


def agent_cfg(tmp_path: Path, refs: Path, **results) -> AgentConfig:
    cfg = make_cfg(tmp_path, refs)
    cfg.publish.endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg.publish.query_endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg.results.out_dir = tmp_path / "out"
    cfg.results.write_overlay = False
    for k, v in results.items():
        setattr(cfg.results, k, v)
    return cfg


class AgentProcess:
    """``AgentConfig`` -> a real agent process; ``up()`` waits for its first heartbeat."""

    def __init__(self, tmp_path: Path, cfg: AgentConfig, name: str = "agent"):
        self.cfg_path = tmp_path / f"{name}.json"
        self.cfg_path.write_text(cfg.model_dump_json())
        self.log_path = tmp_path / f"{name}.log"
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT_CODE, str(self.cfg_path)], cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def up(self, timeout: float = 60.0) -> "AgentProcess":
        with Subscriber(self.cfg.publish.endpoint, ["agent.heartbeat"]) as sub:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                assert self.proc.poll() is None, self.log()
                if sub.recv(timeout_ms=200):
                    return self
        pytest.fail(f"the agent sent no heartbeat in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int, timeout: float = 60.0) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def feed_folder(tmp_path: Path, sxm_dir: Path) -> Path:
    d = tmp_path / "feed"
    d.mkdir(exist_ok=True)
    for n in FEED_SCANS:
        shutil.copy(sxm_dir / n, d / n)
    return d


def stored_ids(store_path: Path) -> tuple[set[str], set[str]]:
    """(recorded frame_ids, frame_ids waiting in the inbox)."""
    with ResultStore(store_path) as store, store._lock:
        done = {r[0] for r in store._db.execute("SELECT frame_id FROM frames")}
        waiting = {r[0] for r in store._db.execute("SELECT frame_id FROM inbox")}
    return done, waiting


# ----------------------------------------------------------------------------- finding 10
def test_second_agent_on_one_store_refuses_with_a_clear_message(tmp_path, refs):
    cfg = agent_cfg(tmp_path, refs)
    first = AgentProcess(tmp_path, cfg, "first").start()
    try:
        first.up()
        second = cfg.model_copy(deep=True)
        second.publish.endpoint = f"tcp://127.0.0.1:{free_port()}"
        second.publish.query_endpoint = None
        (tmp_path / "second.yaml").write_text(json.dumps(second.model_dump(mode="json")))
        out = subprocess.run([sys.executable, "-m", "stm_agent.agent.cli", "run", "--config",
                              str(tmp_path / "second.yaml")], cwd=REPO, capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        assert out.returncode != 0
        assert f"another stm-agent (pid {first.proc.pid}) is using this results store" in " ".join(text.split())
        assert "Traceback" not in text
        assert first.proc.poll() is None  # the first one goes on
    finally:
        assert first.signal(signal.SIGTERM) == 0, first.log()
    # the lock goes with its holder, even after kill -9
    third = AgentProcess(tmp_path, cfg, "third").start()
    try:
        third.up()
        third.proc.kill()
        third.proc.wait(10)
        with ResultStore(cfg.results.store, lock=True):  # free again
            pass
    finally:
        third.kill()


_RESERVE = (
    "import sys\n"
    "from stm_agent.adapters.store import ResultStore\n"
    "s = ResultStore(sys.argv[1])\n"
    "print(' '.join(str(s.reserve_seq(10)) for _ in range(150)))\n"
)


def test_seq_blocks_are_never_handed_to_two_processes(tmp_path):
    db = tmp_path / "results.sqlite"
    ResultStore(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", _RESERVE, str(db)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    firsts = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        firsts += [int(x) for x in out.split()]
    assert len(firsts) == 600 and len(set(firsts)) == 600  # 600 blocks, all distinct
    assert sorted(firsts) == list(range(1, 6001, 10))  # and contiguous: no block lost either


def test_store_files_are_0640(tmp_path):
    with ResultStore(tmp_path / "r.sqlite", lock=True):
        for p in (tmp_path / "r.sqlite", tmp_path / "r.sqlite.lock"):
            assert (p.stat().st_mode & 0o777) == 0o640, p


# ----------------------------------------------------------------------------- finding 9
def test_frame_seq_is_gap_free_and_listen_recovers_a_lost_message(tmp_path, refs, sxm_dir):
    """The frame.counts of the second frame never leaves the agent (as when it is killed right
    after a non-blocking send); ``stm-agent listen`` sees the jump in frame_seq and fetches it
    with ``since``."""
    cfg = agent_cfg(tmp_path, refs)
    agent = Agent(cfg)
    dropped: list[dict] = []
    publish = agent._publish

    def lossy(topic, message):
        if topic == "frame.counts" and message.get("frame_seq") == 2 and not dropped:
            dropped.append(message)
            return message  # "sent" but never left the process
        return publish(topic, message)

    agent._publish = lossy
    run = Running(agent)
    listen = subprocess.Popen([sys.executable, "-m", "stm_agent.agent.cli", "listen", "--json", "--count", "3",
                               "--timeout", "60", "--endpoint", cfg.publish.endpoint, "--query-endpoint",
                               run.agent.query_endpoint], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    lines: list[dict] = []
    try:
        # the listener has joined once it prints a message: send agent.status until it does
        ready = threading.Event()

        def read() -> None:
            for line in listen.stdout:
                lines.append(json.loads(line))
                ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while not ready.wait(0.2):
            assert listen.poll() is None, listen.stderr.read()
            run.agent._publish("agent.status", {"state": "started", "config_digest": "x", "at": "now"})
        for n, src in zip(["a.sxm", "b.sxm", "c.sxm"], [SMALL, REF_SCAN, "hbn_point_defect_96x100_down.sxm"]):
            shutil.copy(sxm_dir / src, tmp_path / "acq" / n)
            run.next("frame.detections", 60, where=lambda m, n=n: m["name"] == n)
        listen.wait(60)
        reader.join(10)
        err = listen.stderr.read()
    finally:
        if listen.poll() is None:
            listen.kill()
        run.stop()
    frames = [m for m in lines if m["topic"] == "frame.counts"]
    assert [m["frame_seq"] for m in frames] == [1, 2, 3], (lines, err)
    assert [m.get("recovered", False) for m in frames] == [False, True, False]
    assert frames[1]["frame_id"] == dropped[0]["frame_id"] and frames[1]["name"] == "b.sxm"
    assert "1 frame(s) recovered" in err
    with ResultStore(cfg.results.store) as store:
        assert [r["frame_seq"] for r in store.since(0)] == [1, 2, 3]


def test_since_query_pages_and_validates(tmp_path, refs, sxm_dir):
    cfg = agent_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    run = Running(Agent(cfg))
    try:
        files = [SMALL, REF_SCAN, "hbn_point_defect_96x100_down.sxm", "moire_10nm_160_down.sxm"]
        for f in files:
            shutil.copy(sxm_dir / f, tmp_path / f)
        
            run.agent.submit(arrival(tmp_path / f))
        for _ in files:
            run.next("frame.counts")
        reply = query(run.agent.query_endpoint, "since 1")
        validate("query.reply", reply)
        assert [f["frame_seq"] for f in reply["frames"]] == [2, 3, 4] and reply["more"] is False
        assert reply["last_frame_seq"] == 4 and [f["name"] for f in reply["frames"]] == files[1:]
        assert query(run.agent.query_endpoint, "since 4")["frames"] == []
        assert "since needs one frame_seq" in query(run.agent.query_endpoint, "since -1")["error"]
        hb = run.next("agent.heartbeat")
        assert hb["last_frame_seq"] == 4
        validate("agent.heartbeat", hb)
    finally:
        run.stop()


def test_gap_filler_pages_through_more_than_one_reply(tmp_path):
    class Store:
        def since(self, n, limit):
            return [{"frame_id": f"{i:064x}", "frame_seq": i, "message": {"frame_id": f"{i:064x}", "x": i}}
                    for i in range(n + 1, min(n + limit, 250) + 1)]

        def last_frame_seq(self):
            return 250

    from stm_agent.adapters.query import store_handler

    with QueryServer("tcp://127.0.0.1:*", store_handler(Store(), lambda: {})) as srv:
        gaps = GapFiller(srv.endpoint)
        assert gaps.on_heartbeat({"last_frame_seq": 10}) == []  # joined: history is not a gap
        got = gaps.on_frame({"frame_id": f"{240:064x}", "frame_seq": 240})
        assert [m["frame_seq"] if r else m["frame_seq"] for m, r in got] == list(range(11, 241))
        assert [r for _, r in got].count(True) == 229 and gaps.missed == 0
        assert gaps.on_frame({"frame_id": f"{240:064x}", "frame_seq": 240, "redelivered": True}) == []
        assert [m["frame_seq"] for m, _ in gaps.on_heartbeat({"last_frame_seq": 250})] == list(range(241, 251))


# ----------------------------------------------------------------------------- finding 8
def _stop_line(log: str) -> tuple[int, int, int, int]:
    m = re.search(r"controller feed: stopped \(.*?\): (\d+) received, (\d+) submitted, (\d+) duplicates, "
                  r"(\d+) not written", log)
    assert m, log
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def test_sigterm_during_a_burst_keeps_every_received_frame(tmp_path, refs, sxm_dir):
    """300 distinct frames as fast as the feed can send them; SIGTERM in the middle. Every frame
    the agent received is recorded or waiting in the inbox (PUB/SUB, issue 15 finding 8)."""
    feed = ReplayFeed(feed_folder(tmp_path, sxm_dir), "tcp://127.0.0.1:*", mode="sxm", interval_s=0.0, count=300,
                      unique=True, sndhwm=50, send_timeout_s=5.0)
    cfg = agent_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    cfg.controller.enabled, cfg.controller.endpoint = True, feed.endpoint
    proc = AgentProcess(tmp_path, cfg).start()
    sent: list = []
    stop = threading.Event()
    try:
        proc.up()
        assert feed.wait_for_subscriber(30)
        t = threading.Thread(target=lambda: sent.extend(feed.run(stop=stop)), daemon=True)
        t.start()
        with ResultStore(cfg.results.store) as store:  # wait until a good part has arrived
            end = time.monotonic() + 120
            while store.pending_count() + store.count() < 60 and time.monotonic() < end:
                time.sleep(0.05)
        assert proc.signal(signal.SIGTERM) == 0, proc.log()
        stop.set()
        t.join(30)
    finally:
        proc.kill()
        feed.close()
    received, submitted, duplicates, unstored = _stop_line(proc.log())
    done, waiting = stored_ids(cfg.results.store)
    print(f"SIGTERM: {received} received, {len(done)} recorded + {len(waiting)} waiting, {unstored} not written")
    assert received >= 60 and duplicates == 0 and unstored == 0
    assert len(done | waiting) == received == submitted  # every received frame is on disk
    assert (done | waiting) <= {s.frame_id for s in sent}


def test_full_disk_holds_the_frame_and_retries_instead_of_dropping(tmp_path, refs, sxm_dir, caplog):
    """The spool write fails with ENOSPC, then the inbox with 'database or disk is full', then the
    worker's record: the feed keeps the frame and retries, the worker keeps its result and
    retries; nothing is lost, the attempt counter is not used up, and the log says it a few
    times, not 30 times a second (issue 15, findings 8 and 14)."""
    feed = ReplayFeed(feed_folder(tmp_path, sxm_dir), "tcp://127.0.0.1:*", mode="sxm", interval_s=0.0)
    cfg = agent_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    cfg.controller.enabled, cfg.controller.endpoint = True, feed.endpoint
    agent = Agent(cfg)
    failures = {"spool": 0, "enqueue": 0, "record": 0}

    def fail_first(name, fn, n, exc):
        def call(*a, **k):
            if failures[name] < n:
                failures[name] += 1
                raise exc
            return fn(*a, **k)
        return call

    full = StoreError(cfg.results.store, "cannot write the results database (database or disk is full)")
    agent._spool = fail_first("spool", agent._spool, 5, OSError(errno.ENOSPC, "No space left on device"))
    agent.store.enqueue = fail_first("enqueue", agent.store.enqueue, 3, full)
    agent.store.record = fail_first("record", agent.store.record, 3, full)
    caplog.set_level(logging.INFO)
    run = Running(agent)
    try:
        assert feed.wait_for_subscriber(30)
        sent = feed.run()
        got = {run.next("frame.counts", 60)["frame_id"] for _ in sent}
        st = run.agent.status()["sources"]["controller"]
    finally:
        run.stop()
        feed.close()
    assert failures == {"spool": 5, "enqueue": 3, "record": 3}
    assert got == {s.frame_id for s in sent} and len(sent) == len(FEED_SCANS)
    assert st["submit_retries"] == 8 and st["unstored"] == 0 and st["submit_errors"] == 0
    with ResultStore(cfg.results.store) as store:
        assert store.count("ok") == len(sent) and store.pending_count() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert 2 <= len(errors) <= 4, errors  # rate-limited: once per 10 s per cause


# ----------------------------------------------------------------------------- ack mode, kill -9
def test_acknowledged_feed_loses_nothing_across_kill_9(tmp_path, refs, sxm_dir):
    """controller.ack: the replay keeps every frame until the agent has it on disk; the agent is
    killed (-9) three times mid-stream and restarted: every frame is recorded exactly once."""
    feed = ReplayFeed(feed_folder(tmp_path, sxm_dir), "tcp://127.0.0.1:*", mode="sxm", interval_s=0.2, count=60,
                      unique=True, ack=True, window=8, ack_timeout_s=3.0, send_timeout_s=120.0)
    cfg = agent_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    cfg.controller.enabled, cfg.controller.endpoint, cfg.controller.ack = True, feed.endpoint, True
    sent: list = []
    t = threading.Thread(target=lambda: sent.extend(feed.run()), daemon=True)
    proc = AgentProcess(tmp_path, cfg).start()
    try:
        proc.up()
        assert feed.wait_for_subscriber(30)
        t.start()
        for kill in range(3):
            with ResultStore(cfg.results.store) as store:
                end = time.monotonic() + 60
                target = 10 * (kill + 1)
                while store.pending_count() + store.count() < target and time.monotonic() < end:
                    time.sleep(0.02)
            proc.proc.kill()
            proc.proc.wait(10)
            proc = AgentProcess(tmp_path, cfg, f"agent{kill}").start()
        t.join(180)
        assert not t.is_alive() and feed.unacked == 0, proc.log()
        with ResultStore(cfg.results.store) as store:
            end = time.monotonic() + 120
            while (store.pending_count() or store.count() < 60) and time.monotonic() < end:
                time.sleep(0.1)
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.kill()
        feed.close()
    done, waiting = stored_ids(cfg.results.store)
    assert len(sent) == 60 and done == {s.frame_id for s in sent} and not waiting
    assert set(feed.acked.values()) <= {"stored", "duplicate"} and len(feed.acked) == 60
    print(f"ack mode, 3 x kill -9: 60 sent, {len(done)} recorded, {feed.resent} sent again")


# ----------------------------------------------------------------------------- finding 7
def test_feed_queue_is_bounded_and_oversized_payloads_do_not_disconnect(sxm_dir):
    """RCVHWM follows max_queue_mb / max_payload_mb; while the agent cannot take frames, the
    controller is held back (NODROP sender gets EAGAIN) after a bounded number of messages; a
    payload over max_payload_mb is refused without dropping the connection."""
    cfg = ControllerConfig(max_payload_mb=1.0, max_queue_mb=2.0, drain_s=0.0)
    assert effective_rcvhwm(cfg) == 2
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.SNDHWM, 2)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    gate = threading.Event()
    got: queue.Queue = queue.Queue()

    def submit(a):
        gate.wait(60)
        got.put(a)

    src = ControllerSource(cfg.model_copy(update={"endpoint": pub.getsockopt_string(zmq.LAST_ENDPOINT)}), submit,
                           context=ctx)
    src.start()
    try:
        assert pub.poll(5000)
        for _ in cfg.topics:
            pub.poll(1000)
            pub.recv()
        base = (sxm_dir / SMALL).read_bytes()
        accepted = 0
        for i in range(200):  # 200 x ~1 MiB: far more than the bound
            payload = base + bytes(480_000) + i.to_bytes(4, "big")
            try:
                pub.send_multipart([b"scan.sxm", b'{"name": "x"}', payload], flags=zmq.NOBLOCK)
                accepted += 1
            except zmq.Again:
                break
        # sender HWM 2 + receiver HWM 2 + one in the source's hands + what the TCP buffers hold
        assert accepted <= 40, f"{accepted} MiB-sized messages queued while the agent was blocked"
        gate.set()
        for _ in range(accepted):
            got.get(timeout=30)
        big = b"x" * int(1.5 * (1 << 20))  # over max_payload_mb, under max_message_mb (2 x)
        pub.send_multipart([b"scan.sxm", b"{}", big])
        pub.send_multipart([b"scan.sxm", b'{"name": "after"}', base])
        a = got.get(timeout=30)
        st = src.stats()
    finally:
        src.stop()
        pub.close(linger=0)
        ctx.term()
    assert a.meta["name"] == "after" and st["malformed"] == {"payload_too_large": 1} and st["rcvhwm"] == 2


# ----------------------------------------------------------------------------- finding 13
_QUERY_SERVER = (
    "import sys, time\n"
    "from stm_agent.adapters.query import QueryServer\n"
    "srv = QueryServer('tcp://127.0.0.1:*', lambda c, a: {'uptime_s': 1} if c == 'status' else None).start()\n"
    "print(srv.endpoint, flush=True)\n"
    "sys.stdin.read()\n"
)


def _hwm_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1))


def test_query_server_does_not_buffer_a_huge_request():
    p = subprocess.Popen([sys.executable, "-c", _QUERY_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        ep = p.stdout.readline().strip()
        assert query(ep, "status")["request"] == "status"
        before = _hwm_kib(p.pid)
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        s.send(b"x" * (128 << 20))  # 128 MiB request
        assert not s.poll(1000)  # dropped unread, no answer
        s.close(linger=0)
        ctx.term()
        assert query(ep, "status")["request"] == "status"  # the server goes on
        grew = _hwm_kib(p.pid) - before
        assert grew < 32 * 1024, f"the query server's peak memory grew by {grew} KiB"
    finally:
        p.stdin.close()
        p.wait(10)


def test_metrics_server_threads_are_bounded():
    pytest.importorskip("prometheus_client")
    import urllib.request

    from stm_agent.adapters.prometheus import MAX_CONNECTIONS, AgentMetrics

    m = AgentMetrics(enabled=True, port=0).start()
    idle = []
    try:
        n0 = threading.active_count()
        for _ in range(100):
            c = socket.create_connection(("127.0.0.1", m.port))
            idle.append(c)
        end = time.monotonic() + 10
        most = 0
        while m._server.refused < 100 - MAX_CONNECTIONS and time.monotonic() < end:
            most = max(most, threading.active_count() - n0)
            time.sleep(0.01)
        assert most <= MAX_CONNECTIONS and threading.active_count() - n0 <= MAX_CONNECTIONS
        assert m._server.refused >= 100 - MAX_CONNECTIONS
        for c in idle:
            c.close()
        end = time.monotonic() + 15
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                assert time.monotonic() < end, "metrics never answered after the idle connections closed"
                time.sleep(0.1)
        assert "stm_agent_queue_depth" in body
    finally:
        for c in idle:
            c.close()
        m.stop()


# ----------------------------------------------------------------------------- finding 14
def test_malformed_flood_is_logged_a_few_times_not_per_message(caplog):
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    src = ControllerSource(ControllerConfig(endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT)), lambda a: True,
                           context=ctx)
    caplog.set_level(logging.INFO, logger="stm_agent.adapters.controller")
    src.start()
    try:
        assert pub.poll(5000)
        for _ in src.cfg.topics:
            pub.poll(1000)
            pub.recv()
        for i in range(500):
            pub.send_multipart([b"scan.sxm", b"{not json" + b"x" * 500, b"p"])
        end = time.monotonic() + 30
        while src.stats()["malformed"].get("header_json", 0) < 500 and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        src.stop()
        pub.close(linger=0)
        ctx.term()
    assert src.stats()["malformed"]["header_json"] == 500
    warned = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(warned) <= 3 and all(len(r.getMessage()) < 700 for r in warned)


# ----------------------------------------------------------------------------- finding 15
def test_spool_budget_warns_and_prune_deletes_only_recorded_scans(tmp_path, refs, sxm_dir, caplog):

    files = [sxm_dir / n for n in FEED_SCANS]
    budget_mb = 0.8  # the three scans spooled take ~1.3 MB
    cfg = agent_cfg(tmp_path, refs, spool_budget_mb=budget_mb)
    cfg.acquisition.enabled = False
    caplog.set_level(logging.INFO)
    run = Running(Agent(cfg))
    try:
        for f in files:
            run.agent.submit(arrival(f, source="controller", payload=True))
        for _ in files:
            run.next("frame.counts")
        hb = run.next("agent.heartbeat", where=lambda m: m["spool"]["over_budget"])  # visible to dashboards
    finally:
        run.stop()
    validate("agent.heartbeat", hb)
    assert hb["spool"]["budget_mb"] == budget_mb and hb["spool"]["mb"] > budget_mb
    spool = tmp_path / "spool"
    assert len(list(spool.glob("*.sxm"))) == 3  # kept by default: they may be the only copy
    assert any("over its budget" in r.getMessage() for r in caplog.records)
    # opt-in deletion: oldest recorded first, never one still waiting
    cfg.results.spool_prune = True
    agent = Agent(cfg)
    try:
        waiting = arrival(sxm_dir / REF_SCAN, source="controller", payload=True)  # 3.6 MB, over budget alone
        agent.submit(waiting)
        agent._spool_budget()
    finally:
        agent.publisher.close()
        agent.store.close()
    assert {p.name for p in spool.glob("*.sxm")} == {f"{waiting.frame_id}.sxm"}
    assert any("deleted 3 recorded scan(s)" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the controller port
def test_curve_pinned_key_ignores_an_impostor(tmp_path, sxm_dir):
    import zmq.auth

    keys = tmp_path / "keys"
    keys.mkdir()
    pub_file, secret_file = zmq.auth.create_certificates(str(keys), "controller")
    other_pub, other_secret = zmq.auth.create_certificates(str(keys), "impostor")
    server_key = zmq.auth.load_certificate(pub_file)[0].decode()
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    folder = feed_folder(tmp_path, sxm_dir)
    got: queue.Queue = queue.Queue()
    src = ControllerSource(ControllerConfig(endpoint=ep, curve_server_key=server_key), lambda a: got.put(a) or True)
    src.start()
    try:
        ctx = zmq.Context()  # its own context: term() returns once the port is released
        with ReplayFeed(folder, ep, mode="sxm", interval_s=0.05, curve_secret_file=other_secret,
                        linger_ms=0, context=ctx) as impostor:  # binds the port first, with the wrong key
            assert not impostor.wait_for_subscriber(2.0)  # the handshake fails: no subscription
            impostor.run()
        ctx.term()
        assert got.empty() and src.stats()["received"] == 0
        with ReplayFeed(folder, ep, mode="sxm", interval_s=0.0, curve_secret_file=secret_file) as real:
            assert real.wait_for_subscriber(10.0)
            sent = real.run()
            names = sorted(got.get(timeout=10).meta["name"] for _ in sent)
    finally:
        src.stop()
    assert names == sorted(FEED_SCANS)
    with pytest.raises(PublishError, match="Z85"):
        ControllerSource(ControllerConfig(endpoint=ep, curve_server_key="short"), lambda a: None).start()


def test_publisher_with_curve_admits_only_listed_subscribers(tmp_path, refs):
    """publish.curve_secret_file + curve_clients_dir: the agent's messages reach only a subscriber
    that pins the agent's key AND whose certificate is listed; a stranger and a plain subscriber
    get nothing (real agent process)."""
    import zmq.auth

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    agent_public, agent_secret = zmq.auth.create_certificates(str(keys), "agent")
    listed_public, listed_secret = zmq.auth.create_certificates(str(keys), "dashboard")
    _, stranger_secret = zmq.auth.create_certificates(str(keys), "stranger")
    shutil.copy(listed_public, clients / "dashboard.key")
    server_key = zmq.auth.load_certificate(agent_public)[0].decode()
    cfg = agent_cfg(tmp_path, refs)
    cfg.publish.curve_secret_file, cfg.publish.curve_clients_dir = Path(agent_secret), clients
    proc = AgentProcess(tmp_path, cfg).start()
    ep = cfg.publish.endpoint
    try:
        with Subscriber(ep, ["agent.heartbeat"], curve_server_key=server_key, curve_secret_file=listed_secret) as ok, \
                Subscriber(ep, ["agent.heartbeat"], curve_server_key=server_key,
                           curve_secret_file=stranger_secret) as stranger, \
                Subscriber(ep, ["agent.heartbeat"]) as plain:
            end = time.monotonic() + 60
            got = None
            while got is None and time.monotonic() < end:
                assert proc.proc.poll() is None, proc.log()
                got = ok.recv(timeout_ms=200)
            assert got is not None and got[0] == "agent.heartbeat", proc.log()
            for _ in range(10):  # ten more heartbeat periods (0.2 s): the listed one keeps getting them
                assert ok.recv(timeout_ms=2000) is not None
            assert stranger.recv(timeout_ms=0) is None and plain.recv(timeout_ms=0) is None
        # the query endpoint serves with the same keys: the listed client is answered, a stranger and
        # a plain client are not (no frame is ever answered in clear)
        from stm_agent.adapters.query import query

        qep = cfg.publish.query_endpoint
        assert "status" in query(qep, "status", 10000, curve_server_key=server_key, curve_secret_file=listed_secret)
        for kw in ({}, {"curve_server_key": server_key, "curve_secret_file": stranger_secret}):
            with pytest.raises(PublishError, match="no answer"):
                query(qep, "latest", 500, **kw)
        # `stm-agent status` reads the agent's key from its config; a listed client certificate gets in
        st = subprocess.run([sys.executable, "-m", "stm_agent.agent.cli", "status", "--config", str(proc.cfg_path),
                             "--client-cert", str(listed_secret), "--json", "--timeout", "10"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and json.loads(st.stdout)["agent"]["status"], st.stdout + st.stderr
    finally:
        assert proc.signal(signal.SIGTERM) == 0, proc.log()
    out = subprocess.run([sys.executable, "-m", "stm_agent.agent.cli", "listen", "--endpoint", ep,
                          "--server-key", "short", "--query-endpoint", "none"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "Z85" in out.stderr + out.stdout and "Traceback" not in out.stderr
