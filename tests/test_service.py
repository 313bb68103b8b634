"""The agent as a service, end to end: the controller feed (all three topics), Nanonis TCP and the
acquisition folder running at once in one real Agent; every published message is validated against
the JSON Schemas; every frame has its store row; the query endpoint answers a late joiner."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from stm_agent.adapters.query import query
from stm_agent.adapters.replay import ReplayFeed
from stm_agent.adapters.schemas import validate
from stm_agent.adapters.store import ResultStore
from stm_agent.agent.daemon import Agent

from tests.fake_nanonis import FakeNanonis
from tests.helpers import OTHER, REF_SCAN, SMALL, Running, make_cfg, sha  # noqa: F401


def _feed_dir(tmp_path, sxm_dir, names):
    d = tmp_path / "feed"
    d.mkdir(exist_ok=True)
    for n in names:
        shutil.copy(sxm_dir / n, d / n)
    return d


@pytest.mark.parametrize("mode", ["sxm", "array", "saved"])
def test_controller_feed_in_message_out_row_stored(tmp_path, refs, sxm_dir, mode):
    feed_dir = _feed_dir(tmp_path, sxm_dir, [REF_SCAN, SMALL])
    feed = ReplayFeed(feed_dir, "tcp://127.0.0.1:*", mode=mode, interval_s=0.05)
    cfg = make_cfg(tmp_path, refs)
    cfg.acquisition.enabled = False
    cfg.controller.enabled = True
    cfg.controller.endpoint = feed.endpoint
    cfg.acquisition.roots = [tmp_path / "feed"]  # scan.saved paths must lie in the acquisition roots
    cfg.publish.query_endpoint = "tcp://127.0.0.1:*"
    run = Running(Agent(cfg))
    try:
        assert feed.wait_for_subscriber(10)
        sent = feed.run()
        msgs = {}
        while len(msgs) < len(sent):
            m = run.next("frame.counts")
            msgs[m["frame_id"]] = m
        assert set(msgs) == {s.frame_id for s in sent}
        for m in msgs.values():
            validate("frame.counts", m)
            assert m["status"] == "ok" and m["source"] == "controller", m
            # scan.saved names the file the controller saved; bytes and arrays come without a path
            assert m["path"] == (str(feed_dir / m["name"]) if mode == "saved" else None), m["path"]
        ads = next(m for m in msgs.values() if m["name"] == REF_SCAN)
        assert ads["counts"]["adsorbate"] >= 1  # the scan the reference was picked from
        if mode == "array":  # the array carries the scan parameters of the file it came from
            assert ads["scan"]["pixels"] == [256, 256] and ads["scan"]["bias_V"] == pytest.approx(2.0)
        # a late joiner asks for what it missed
        reply = query(run.agent.query_endpoint, f"frame {sent[0].frame_id[:12]}")
        validate("query.reply", reply)
        assert reply["frame"]["frame_id"] == sent[0].frame_id and isinstance(reply["detections"], list)
        assert query(run.agent.query_endpoint, "latest")["frame"]["frame_id"] == sent[-1].frame_id
        hb = run.next("agent.heartbeat")
        validate("agent.heartbeat", hb)
        assert hb["sources"]["controller"]["submitted"] == len(sent)
        assert hb["last_frame_name"] == msgs[hb["last_frame_id"]]["name"]
        assert hb["model"]["provider"] is None  # the pixel encoder runs no onnxruntime session
    finally:
        stopping = run.stop()
        feed.close()
    validate("agent.status", stopping)
    with ResultStore(tmp_path / "results.sqlite") as store:
        for s in sent:
            row = store.get(s.frame_id)
            assert row["status"] == "ok" and row["source"] == "controller" and row["published_at"]
            assert row["counts"] == msgs[s.frame_id]["counts"]


def test_three_sources_at_once_each_frame_once(tmp_path, refs, sxm_dir):
    """Folder, controller feed and Nanonis TCP run together; the same scan arriving from all three
    is processed once; distinct scans from each are all processed."""
    feed = ReplayFeed(_feed_dir(tmp_path, sxm_dir, [SMALL]), "tcp://127.0.0.1:*", mode="sxm", interval_s=0)
    saved = tmp_path / "nanonis"
    saved.mkdir()
    with FakeNanonis(chunk=5) as nanonis:
        cfg = make_cfg(tmp_path, refs)
        cfg.controller.enabled, cfg.controller.endpoint = True, feed.endpoint
        cfg.nanonis.enabled, cfg.nanonis.port, cfg.nanonis.wait_timeout_s = True, nanonis.port, 0.2
        cfg.acquisition.roots = [saved]  # where Nanonis saves: an acquisition root
        run = Running(Agent(cfg))
        try:
            assert feed.wait_for_subscriber(10)
            feed.run()  # SMALL via the feed
            shutil.copy(sxm_dir / OTHER, saved / "Scan_001.sxm")
            nanonis.push_path(str(saved / "Scan_001.sxm"))  # OTHER via Nanonis
            shutil.copy(sxm_dir / REF_SCAN, tmp_path / "acq" / "Image_1.sxm")  # REF_SCAN via the folder
            got = {}
            while len(got) < 3:
                m = run.next("frame.counts")
                got[m["frame_id"]] = m["source"]
            assert got == {sha(sxm_dir / SMALL): "controller", sha(sxm_dir / OTHER): "nanonis",
                           sha(sxm_dir / REF_SCAN): "folder"}
            # the same scans again, crosswise: nothing new
            mark = len(run.log)
            shutil.copy(sxm_dir / SMALL, tmp_path / "acq" / "again.sxm")
            nanonis.push_path(str(tmp_path / "acq" / "again.sxm"))
            shutil.copy(sxm_dir / OTHER, tmp_path / "acq" / "again2.sxm")
            run.idle()
            assert run.frames(1.0, since=mark) == []
        finally:
            status = run.stop()
            feed.close()
    assert status["frames_done"] == 3
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert store.count() == 3 and store.pending_count() == 0
