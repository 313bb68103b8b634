"""Durable results: the on-disk inbox, exactly-once recording, re-publication, seq across restarts,
and SIGKILL at random points (real processes, real sockets, a real SQLite file, real scans)."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stm_agent.adapters.store import ResultStore
from stm_agent.adapters.zmq_io import Subscriber
from stm_agent.agent.daemon import MAX_ATTEMPTS, Agent

from tests.helpers import OTHER, REF_SCAN, SMALL, Running, arrival, free_port, make_cfg, sha, wait_connected  # noqa: F401



def test_inbox_holds_work_on_disk_and_each_frame_once_from_two_sources(tmp_path, refs, sxm_dir):
    """Frames submitted before the worker runs wait in the store (not in memory), in order; the same
    scan from the folder and from the controller feed is taken once."""
    cfg = make_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    agent = Agent(cfg)
    (tmp_path / "acq").mkdir()  # file frames are read from the acquisition roots only
    files = [Path(shutil.copy(sxm_dir / n, tmp_path / "acq" / n)) for n in (SMALL, OTHER, REF_SCAN)]
    assert [agent.submit(arrival(f)) for f in files] == [True, True, True]
    assert agent.submit(arrival(sxm_dir / OTHER, source="controller", payload=True)) is False  # same sha256
    assert agent.store.pending_count() == 3
    with ResultStore(tmp_path / "results.sqlite") as other_reader:  # another connection sees the queue
        assert other_reader.pending_count() == 3
    run = Running(agent)
    done = [run.next("frame.counts") for _ in files]
    assert [m["frame_id"] for m in done] == [sha(f) for f in files]  # oldest first
    assert all(m["status"] == "ok" and m["source"] == "folder" for m in done)
    assert run.agent.store.pending_count() == 0
    assert not list((tmp_path / "spool").glob("*"))  # the duplicate payload was never spooled
    # recorded frames are not taken again, from any source
    assert agent.submit(arrival(sxm_dir / SMALL, source="controller", payload=True)) is False
    run.stop()
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert store.count() == 3 and all(r["published_at"] for r in store.latest(10))


def test_controller_payload_is_spooled_then_processed(tmp_path, refs, sxm_dir):
    cfg = make_cfg(tmp_path, refs, results_next_to_scans=True)  # results beside the spooled payload
    cfg.acquisition.enabled = False
    run = Running(Agent(cfg))
    a = arrival(sxm_dir / REF_SCAN, source="controller", payload=True)
    run.agent.submit(a)
    msg = run.next("frame.counts")
    assert msg["status"] == "ok" and msg["source"] == "controller" and msg["frame_id"] == a.frame_id
    assert msg["path"] is None and msg["name"] == REF_SCAN and msg["counts"]["adsorbate"] >= 1
    spooled = tmp_path / "spool" / f"{a.frame_id}.sxm"
    assert spooled.read_bytes() == (sxm_dir / REF_SCAN).read_bytes()  # kept: keep_received is true
    assert all(Path(f).parent == spooled.parent for f in msg["files"])
    run.stop()


def test_recorded_but_unpublished_frame_is_published_again(tmp_path, refs, sxm_dir):
    """Simulates a kill between recording and publishing: the next start publishes it, flagged."""
    cfg = make_cfg(tmp_path, refs)
    run = Running(Agent(cfg))
    shutil.copy(sxm_dir / SMALL, tmp_path / "acq" / "a.sxm")
    first = run.next("frame.counts")
    last_seq = run.stop()["seq"]
    with ResultStore(tmp_path / "results.sqlite") as store:
        store._exec("UPDATE frames SET published_at = NULL")
    port = free_port()
    cfg2 = make_cfg(tmp_path, refs)
    cfg2.publish.endpoint = f"tcp://127.0.0.1:{port}"
    sub = Subscriber(cfg2.publish.endpoint)
    agent = Agent(cfg2)  # binds the PUB socket
    assert wait_connected(sub), "the SUB socket did not connect to the agent"
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        got, end = None, time.monotonic() + 10
        while time.monotonic() < end:
            got = sub.recv(timeout_ms=100)
            if got and got[0] == "frame.counts":
                break
        assert got and got[0] == "frame.counts", "the unpublished frame was not published again"
        again = got[1]
        assert again["frame_id"] == first["frame_id"] and again["redelivered"] is True
        assert again["counts"] == first["counts"] and again["seq"] > last_seq  # seq survives restarts
    finally:
        agent.stop()
        t.join(10)
        sub.close()
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert store.count() == 1 and store.unpublished() == []


def test_frame_that_kills_the_agent_every_time_is_given_up(tmp_path, refs, sxm_dir):
    cfg = make_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    agent = Agent(cfg)
    a = arrival(sxm_dir / SMALL)
    agent.submit(a)
    for _ in range(MAX_ATTEMPTS):  # each claim without a record = a run that died mid-frame
        assert agent.store.claim()["frame_id"] == a.frame_id
    msg = agent.process_next()
    assert msg["status"] == "error" and msg["reason"].startswith(f"given up after {MAX_ATTEMPTS} attempts")
    assert agent.store.pending_count() == 0 and agent.store.get(a.frame_id)["status"] == "error"
    agent.publisher.close()
    agent.store.close()


# The real agent in a process of its own; each frame takes >= 0.15 s more so that kills land mid-frame.
_AGENT_CODE = (
    "import logging, sys, time\n"
    "logging.basicConfig(level=logging.WARNING)\n"
    "from stm_agent.agent.config import AgentConfig\n"
    "from stm_agent.agent.daemon import Agent, install_signal_handlers\n"
    "from stm_agent.agent.pipeline import Recognizer\n"
    "cfg = AgentConfig.model_validate_json(open(sys.argv[1]).read())\n"
    "rec = Recognizer.from_config(cfg)\n"
    "inner = rec.recognise\n"
    "rec.recognise = lambda scan: (time.sleep(0.15), inner(scan))[1]\n"
    "a = Agent(cfg, recognizer=rec); install_signal_handlers(a); a.run()\n"
)


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing_and_records_once(tmp_path, refs, sxm_dir):
    """kill -9 the agent at random moments while it works through a folder of real scans; restart;
    repeat. In the end every scan is recorded exactly once, nothing waits in the inbox, every
    frame was published, and no frame was published twice without the ``redelivered`` flag."""
    files = sorted(p for p in sxm_dir.glob("*.sxm"))
    acq = tmp_path / "acq"
    acq.mkdir()
    for f in files:
        shutil.copy(f, acq / f.name)
    expected = {sha(f) for f in files}
    cfg = make_cfg(tmp_path, refs)
    cfg.publish.endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg.results.write_overlay = False
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    sub = Subscriber(cfg.publish.endpoint)
    rng = random.Random(20261122)
    received: list[dict] = []
    mid_frame_kills = 0

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            got = sub.recv(timeout_ms=50)
            if got and got[0] == "frame.counts":
                received.append(got[1])

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _AGENT_CODE, str(tmp_path / "cfg.json")], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    try:
        for _ in range(3):
            proc = start()
            # wait until it works (a frame published), then kill at a random moment
            end = time.monotonic() + 30
            n0 = len(received)
            while len(received) == n0 and time.monotonic() < end and proc.poll() is None:
                drain(0.05)
            drain(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            with ResultStore(tmp_path / "results.sqlite") as store:
                with store._lock:
                    mid_frame_kills += store._db.execute(
                        "SELECT COUNT(*) FROM inbox WHERE attempts > 0").fetchone()[0]
                    print("after kill:", store.count(), "recorded,", store.pending_count(), "waiting,",
                          len(received), "received")
        proc = start()
        with ResultStore(tmp_path / "results.sqlite") as store:
            end = time.monotonic() + 90
            while time.monotonic() < end and (store.count() < len(expected) or store.pending_count()):
                drain(0.2)
        drain(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stdout.read().decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    with ResultStore(tmp_path / "results.sqlite") as store:
        with store._lock:
            ids = [r[0] for r in store._db.execute("SELECT frame_id FROM frames")]
        assert sorted(ids) == sorted(expected)  # nothing lost, nothing twice
        assert store.pending_count() == 0 and store.unpublished() == []
        assert store.count("error") == sum(1 for f in files if f.name.startswith("aborted"))
    first_time = [m["frame_id"] for m in received if not m["redelivered"]]
    assert len(first_time) == len(set(first_time)), "a frame was published twice as new"
    assert mid_frame_kills >= 1, "no kill landed in the middle of a frame; the test proved nothing"
    print(f"{mid_frame_kills} kill(s) mid-frame, {len(received)} messages, "
          f"{sum(m['redelivered'] for m in received)} redelivered")
