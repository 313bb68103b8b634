"""Controller feed source, replay feed and ``stm-agent replay``: real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import time

import numpy as np
import pytest
import typer
import zmq
from typer.testing import CliRunner

from stm_agent.adapters.arrayscan import array_meta_from_scan, encode_array_message, encode_saved_message, encode_sxm_message, scan_from_array
from stm_agent.adapters.controller import ControllerSource
from stm_agent.adapters.files import sha256_file
from stm_agent.adapters.replay import ReplayFeed
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.cli_feed import replay
from stm_agent.agent.config import ControllerConfig
from stm_agent.agent.errors import ConfigError
from tests.helpers import wait_until

SMALL = ["porphyrin_dimer_96_up_7ch.sxm", "hbn_point_defect_96x100_down.sxm", "moire_10nm_160_down.sxm"]




class Feed:
    """A test 'controller': XPUB bound on an ephemeral port, and a ControllerSource connected to it."""

    def __init__(self, known=lambda fid: False, submit=None, **cfg):
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.got: queue.Queue = queue.Queue()
        self.src = ControllerSource(ControllerConfig(endpoint=self.endpoint, **cfg), submit or self.got.put, known,
                                    context=self.ctx)

    def __enter__(self):
        self.src.start()
        assert self.pub.poll(5000), "the source never subscribed"
        n = len(self.src.cfg.topics)
        for _ in range(n):  # one subscription per topic
            self.pub.poll(1000)
            self.pub.recv()
        return self

    def send(self, frames):
        self.pub.send_multipart(frames)

    def next(self, timeout=5.0):
        return self.got.get(timeout=timeout)

    def __exit__(self, *exc):
        self.src.stop()
        self.pub.close(linger=0)
        self.ctx.term()


def test_scan_sxm_submits_raw_bytes(sxm_dir):
    path = sxm_dir / SMALL[0]
    data = path.read_bytes()
    with Feed() as f:
        f.send(encode_sxm_message(data, path.name))
        a = f.next()
        st = f.src.stats()
    assert a.kind == "sxm" and a.source == "controller" and a.path is None and a.error is None
    assert a.payload == data and a.size == len(data)
    assert a.frame_id == hashlib.sha256(data).hexdigest() == sha256_file(path)[0]
    assert a.meta == {"name": path.name} and a.name == path.name
    assert a.received_at.tzinfo is not None and a.received_mono <= time.monotonic()
    assert read_sxm(a.payload).frame_id == a.frame_id
    assert st["received"] == 1 and st["submitted"] == 1 and st["malformed"] == {} and st["alive"]
    assert st["endpoint"] == f.endpoint


def test_scan_array_and_saved(sxm_dir, tmp_path):
    scan = read_sxm(sxm_dir / SMALL[1])
    frames = encode_array_message(scan.frame("Z"), array_meta_from_scan(scan))
    copy = tmp_path / "saved scan.sxm"
    shutil.copy(sxm_dir / SMALL[2], copy)
    with Feed() as f:
        f.send(frames)
        a = f.next()
        f.send(encode_saved_message(copy))
        b = f.next()
        f.send(encode_saved_message(tmp_path / "gone.sxm"))
        c = f.next()
        st = f.src.stats()
    assert a.kind == "array" and a.payload == frames[2] and a.frame_id == hashlib.sha256(frames[2]).hexdigest()
    assert a.meta == json.loads(frames[1])
    s = scan_from_array(a.meta, a.payload, source="controller:x", frame_id=a.frame_id)
    np.testing.assert_array_equal(s.frame("Z"), scan.frame("Z"))
    assert b.kind == "file" and b.path == copy and b.error is None and b.payload is None
    assert (b.frame_id, b.size) == sha256_file(sxm_dir / SMALL[2])
    gone = str(tmp_path / "gone.sxm")
    assert c.kind == "file" and c.error and gone in c.error and "cannot read" in c.error
    assert c.frame_id == hashlib.sha256(b"missing:" + gone.encode()).hexdigest()
    assert st["submitted"] == 3 and st["errors"] == 1


def test_malformed_messages_are_counted_and_source_keeps_working(sxm_dir):
    data = (sxm_dir / SMALL[0]).read_bytes()
    arr = np.zeros((4, 5), "<f4")
    good_arr = encode_array_message(arr, {"pixel_size_nm": 0.1})
    hdr = json.loads(good_arr[1])
    bad = [
        ([b"scan.sxm"], "frames"),
        ([b"scan.sxm", b"{}", b"x", b"y"], "frames"),
        ([b"scan.sxm\xff", b"{}", b"x"], "topic"),  # subscribed prefix, not UTF-8
        ([b"scan.sxmX", b"{}", b"x"], "topic"),  # subscribed by prefix, unknown topic
        ([b"scan.sxm", b"\xff{}", data], "header_utf8"),
        ([b"scan.sxm", b"{not json", data], "header_json"),
        ([b"scan.sxm", b"[1, 2]", data], "header_object"),
        ([b"scan.sxm", b"{}"], "payload_missing"),
        ([b"scan.sxm", b"{}", b""], "payload_missing"),
        ([b"scan.array", json.dumps({**hdr, "shape": [4, 6]}).encode(), good_arr[2]], "payload_size"),
        ([b"scan.array", json.dumps({k: v for k, v in hdr.items() if k != "dtype"}).encode(), good_arr[2]], "field:dtype"),
        ([b"scan.array", json.dumps({**hdr, "dtype": "<U1"}).encode(), good_arr[2]], "field:dtype"),
        ([b"scan.array", json.dumps({**hdr, "shape": "4x5"}).encode(), good_arr[2]], "field:shape"),
        ([b"scan.array", json.dumps({"shape": [4, 5], "dtype": "<f4"}).encode(), good_arr[2]], "field:pixel_size_nm"),
        ([b"scan.saved", b"{}"], "field:path"),
        ([b"scan.saved", b'{"path": 3}'], "field:path"),
        ([b"scan.saved", b'{"path": "/x.sxm"}', b"payload"], "payload_unexpected"),
        ([b"scan.sxm", b"{}", b"x" * ((1 << 20) + 1)], "payload_too_large"),
    ]
    expected: dict[str, int] = {}
    for _, key in bad:
        expected[key] = expected.get(key, 0) + 1
    with Feed(max_payload_mb=1.0) as f:
        for frames, _ in bad:
            f.send(frames)
        f.send(encode_sxm_message(data, "ok.sxm"))
        a = f.next()
        st = f.src.stats()
        assert f.got.empty()
    assert a.frame_id == hashlib.sha256(data).hexdigest() and a.meta["name"] == "ok.sxm"
    assert st["malformed"] == expected
    assert st["received"] == len(bad) + 1 and st["submitted"] == 1 and st["alive"]


def test_duplicates_and_failing_submit(sxm_dir):
    data = (sxm_dir / SMALL[0]).read_bytes()
    other = (sxm_dir / SMALL[1]).read_bytes()
    known_id = hashlib.sha256(other).hexdigest()
    calls = []

    def submit(a):
        calls.append(a)
        if len(calls) == 1:
            raise RuntimeError("store is locked")

    with Feed(known=lambda fid: fid == known_id, submit=submit) as f:
        f.send(encode_sxm_message(data, "a"))  # submit raises: counted, not remembered
        f.send(encode_sxm_message(data, "a"))  # retried, accepted
        f.send(encode_sxm_message(data, "a"))  # repeat: duplicate
        f.send(encode_sxm_message(other, "b"))  # known to the store: duplicate
        assert wait_until(lambda: f.src.stats()["received"] == 4)
        st = f.src.stats()
    assert len(calls) == 2
    assert st["submit_errors"] == 1 and st["submitted"] == 1 and st["duplicates"] == 2


def test_stop_is_quick_and_idempotent():
    src = ControllerSource(ControllerConfig(endpoint="tcp://127.0.0.1:1"), lambda a: None)
    src.start()
    t = time.monotonic()
    src.stop()
    src.stop()
    assert time.monotonic() - t < 1.0 and not src.stats()["alive"]


@pytest.mark.parametrize("mode", ["sxm", "array", "saved"])
def test_replay_to_controller_end_to_end(sxm_dir, tmp_path, mode):
    folder = tmp_path / "scans"
    folder.mkdir()
    for n in SMALL:
        shutil.copy(sxm_dir / n, folder / n)
    got: queue.Queue = queue.Queue()
    with ReplayFeed(folder, "tcp://127.0.0.1:*", mode=mode, interval_s=0.0) as feed:
        src = ControllerSource(ControllerConfig(endpoint=feed.endpoint), got.put)
        src.start()
        try:
            assert feed.wait_for_subscriber(5.0)
            sent = feed.run()
            arrivals = [got.get(timeout=5) for _ in sent]
        finally:
            src.stop()
    assert [s.name for s in sent] == sorted(SMALL)  # sorted by name
    assert [a.frame_id for a in arrivals] == [s.frame_id for s in sent]
    for a, name in zip(arrivals, sorted(SMALL)):
        if mode == "sxm":
            assert a.kind == "sxm" and a.frame_id == sha256_file(folder / name)[0]
        elif mode == "array":
            scan = read_sxm(folder / name)
            s = scan_from_array(a.meta, a.payload, source="c", frame_id=a.frame_id)
            np.testing.assert_array_equal(s.frame("Z"), scan.frame("Z"))
            assert s.pixel_size_nm == pytest.approx(scan.pixel_size_nm)
        else:
            assert a.kind == "file" and a.path == (folder / name).resolve() and a.frame_id == sha256_file(folder / name)[0]


@pytest.mark.parametrize("mode", ["sxm", "array"])
def test_replay_unique_frames_are_distinct_and_read(sxm_dir, tmp_path, mode):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(sxm_dir / SMALL[0], folder / SMALL[0])
    got: queue.Queue = queue.Queue()
    with ReplayFeed(folder, "tcp://127.0.0.1:*", mode=mode, interval_s=0.0, count=20, unique=True) as feed:
        src = ControllerSource(ControllerConfig(endpoint=feed.endpoint), got.put)
        src.start()
        try:
            assert feed.wait_for_subscriber(5.0)
            sent = feed.run()
            arrivals = [got.get(timeout=5) for _ in sent]
            st = src.stats()
        finally:
            src.stop()
    assert len(sent) == 20 and len({a.frame_id for a in arrivals}) == 20 and st["duplicates"] == 0
    for a in arrivals[:3] + arrivals[-2:]:
        if mode == "sxm":
            assert read_sxm(a.payload).frame_id == a.frame_id
        else:
            scan_from_array(a.meta, a.payload, source="c", frame_id=a.frame_id)


def test_replay_without_unique_repeats_are_duplicates(sxm_dir, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(sxm_dir / SMALL[0], folder / SMALL[0])
    got: queue.Queue = queue.Queue()
    with ReplayFeed(folder, "tcp://127.0.0.1:*", mode="sxm", interval_s=0.01, count=3) as feed:
        src = ControllerSource(ControllerConfig(endpoint=feed.endpoint), got.put)
        src.start()
        try:
            assert feed.wait_for_subscriber(5.0)
            t0 = time.monotonic()
            sent = feed.run()
            assert time.monotonic() - t0 >= 0.02  # interval respected (frames at 0, 0.01, 0.02 s)
            assert wait_until(lambda: src.stats()["received"] == 3)
            st = src.stats()
        finally:
            src.stop()
    assert len(sent) == 3 and st["submitted"] == 1 and st["duplicates"] == 2


def test_replay_rejects_bad_setup(tmp_path, sxm_dir):
    with pytest.raises(ConfigError, match="no .sxm"):
        ReplayFeed(tmp_path, "tcp://127.0.0.1:*")
    with pytest.raises(ConfigError, match="mode"):
        ReplayFeed(sxm_dir, "tcp://127.0.0.1:*", mode="png")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unique"):
        ReplayFeed(sxm_dir, "tcp://127.0.0.1:*", mode="saved", unique=True)
    # array mode skips what cannot be read (all-NaN scan) and reports it
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(sxm_dir / "aborted_all_nan_240x96_up_angle31.sxm", folder / "a.sxm")
    shutil.copy(sxm_dir / SMALL[0], folder / "b.sxm")
    with ReplayFeed(folder, "tcp://127.0.0.1:*", mode="array", interval_s=0) as feed:
        sent = feed.run()
    assert [s.name for s in sent] == ["b.sxm"] and "no acquired lines" in feed.skipped["a.sxm"]


def test_cli_replay(sxm_dir, tmp_path):
    app = typer.Typer()
    app.command()(replay)
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(sxm_dir / SMALL[0], folder / SMALL[0])
    r = CliRunner().invoke(app, [str(folder), "--endpoint", "tcp://127.0.0.1:*", "--interval", "0",
                                 "--count", "2", "--unique", "--wait-subscriber", "0"])
    assert r.exit_code == 0, r.output
    assert "sent 2 frame(s), 2 distinct" in r.output and SMALL[0] in r.output
    r = CliRunner().invoke(app, [str(tmp_path / "nope"), "--endpoint", "tcp://127.0.0.1:*"])
    assert r.exit_code == 2 and "not a folder" in r.output
    r = CliRunner().invoke(app, [str(folder), "--mode", "png"])
    assert r.exit_code == 2 and "--mode" in r.output
