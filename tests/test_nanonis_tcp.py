"""Nanonis TCP source against a fake Nanonis server (127.0.0.1, replies sent 7 bytes at a time)."""

from __future__ import annotations

import logging
import queue
import shutil
import socket
import struct
import time

import pytest

from stm_agent.adapters.files import sha256_file
from stm_agent.adapters.nanonis_tcp import NanonisClient, NanonisError, NanonisSource, pack_header, parse_wait_reply
from stm_agent.agent.config import NanonisConfig
from tests.fake_nanonis import FakeNanonis, wait_reply_body
from tests.helpers import wait_until

SCAN = "porphyrin_dimer_96_up_7ch.sxm"
OTHER = "hbn_point_defect_96x100_down.sxm"




def _source(port, got, **kw):
    cfg = NanonisConfig(host="127.0.0.1", port=port, wait_timeout_s=0.2, reconnect_s=0.1)
    return NanonisSource(cfg, got.put, **kw)


def test_header_and_reply_parsing():
    h = pack_header("Scan.WaitEndOfScan", 4)
    assert len(h) == 40 and h[:18] == b"Scan.WaitEndOfScan" and h[18:32] == b"\0" * 14
    assert struct.unpack(">iHH", h[32:]) == (4, 1, 0)
    r = parse_wait_reply(wait_reply_body(False, "C:\\data\\scan 1.sxm"))
    assert (r.timed_out, r.path, r.error_status, r.error) == (False, "C:\\data\\scan 1.sxm", 0, "")
    r = parse_wait_reply(wait_reply_body(True, "", 1, "busy"))
    assert r.timed_out and r.error_status == 1 and r.error == "busy"
    cp1252 = struct.pack(">Ii", 0, 6) + "a\xb0.sxm".encode("cp1252") + struct.pack(">Ii", 0, 0)
    assert parse_wait_reply(cp1252).path == "a\xb0.sxm"
    with pytest.raises(NanonisError, match="too short"):
        parse_wait_reply(struct.pack(">Ii", 0, 50) + b"abc")
    with pytest.raises(NanonisError, match="too short"):
        parse_wait_reply(b"\0\0")


def test_client_reassembles_chunked_replies(sxm_dir, tmp_path):
    with FakeNanonis(chunk=3) as fake:
        fake.push_path("/some/where/long/path/" + "x" * 200 + ".sxm")
        c = NanonisClient("127.0.0.1", fake.port)
        try:
            r = c.wait_end_of_scan(1000)
            assert r.path.endswith("x" * 200 + ".sxm") and not r.timed_out
            assert c.wait_end_of_scan(50).timed_out  # nothing queued: fake times out
        finally:
            c.close()
    assert fake.requests == [("Scan.WaitEndOfScan", 1000), ("Scan.WaitEndOfScan", 50)]


def test_source_submits_scans_ignores_timeouts_counts_errors_and_reconnects(sxm_dir, tmp_path, caplog):
    a, b = tmp_path / "scan a.sxm", tmp_path / "scan_b.sxm"
    shutil.copy(sxm_dir / SCAN, a)
    shutil.copy(sxm_dir / OTHER, b)
    got: queue.Queue = queue.Queue()
    caplog.set_level(logging.INFO, logger="stm_agent.adapters.nanonis_tcp")
    with FakeNanonis(chunk=7) as fake:
        src = _source(fake.port, got)
        src.start()
        try:
            assert wait_until(lambda: src.stats()["connected"])
            fake.push_timeout()
            fake.push_path(str(a))
            first = got.get(timeout=5)
            fake.push_error("Scan not running")
            assert wait_until(lambda: src.stats()["errors"] == 1)
            fake.push_drop()  # the server closes the connection instead of replying
            assert wait_until(lambda: fake.connections == 2)
            fake.push_path(str(b))
            second = got.get(timeout=5)
            st = src.stats()
        finally:
            src.stop()
    assert first.kind == "file" and first.source == "nanonis" and first.path == a and first.error is None
    assert (first.frame_id, first.size) == sha256_file(sxm_dir / SCAN)
    assert second.path == b and second.frame_id == sha256_file(sxm_dir / OTHER)[0]
    assert st["scans"] == 2 and st["errors"] == 1 and st["reconnects"] == 1 and st["timeouts"] >= 1
    assert st["connected"] and got.empty()
    assert all(cmd == "Scan.WaitEndOfScan" and ms == 200 for cmd, ms in fake.requests)
    assert "Scan not running" in caplog.text
    assert caplog.text.count("connection to 127.0.0.1") == 1  # logged once, not per attempt


def test_unreachable_logs_once_then_connects_when_nanonis_starts(sxm_dir, tmp_path, caplog):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    got: queue.Queue = queue.Queue()
    caplog.set_level(logging.INFO, logger="stm_agent.adapters.nanonis_tcp")
    src = _source(port, got)
    src.start()
    try:
        time.sleep(0.5)  # ~5 failed attempts at reconnect_s = 0.1
        st = src.stats()
        assert not st["connected"] and st["alive"]
        assert caplog.text.count("unreachable") == 1
        with FakeNanonis(port=port) as fake:  # Nanonis starts: the source connects and works
            assert wait_until(lambda: src.stats()["connected"])
            path = tmp_path / "s.sxm"
            shutil.copy(sxm_dir / SCAN, path)
            fake.push_path(str(path))
            assert got.get(timeout=5).path == path
        assert src.stats()["reconnects"] == 1
    finally:
        t = time.monotonic()
        src.stop()
        assert time.monotonic() - t < 1.0


def test_incomplete_file_becomes_an_error_arrival(sxm_dir, tmp_path):
    part = tmp_path / "growing.sxm"
    data = (sxm_dir / SCAN).read_bytes()
    part.write_bytes(data[: len(data) // 2])
    got: queue.Queue = queue.Queue()
    with FakeNanonis() as fake:
        src = _source(fake.port, got, complete_wait_s=0.3)
        src.start()
        try:
            fake.push_path(str(part))
            bad = got.get(timeout=5)
            fake.push_path(str(tmp_path / "missing.sxm"))
            gone = got.get(timeout=5)
            st = src.stats()
        finally:
            src.stop()
    assert bad.error and "incomplete after" in bad.error and f"{len(data) // 2} of the {len(data)} bytes" in bad.error
    assert bad.path == part and bad.frame_id == sha256_file(part)[0]
    assert gone.error and "file not found" in gone.error and str(tmp_path / "missing.sxm") in gone.error
    assert st["errors"] == 2 and st["scans"] == 0


def test_file_completing_while_waiting_is_submitted_complete(sxm_dir, tmp_path):
    path = tmp_path / "late.sxm"
    data = (sxm_dir / SCAN).read_bytes()
    path.write_bytes(data[:1000])
    got: queue.Queue = queue.Queue()
    with FakeNanonis() as fake:
        src = _source(fake.port, got, complete_wait_s=5.0, known=lambda fid: False)
        src.start()
        try:
            fake.push_path(str(path))
            time.sleep(0.2)
            path.write_bytes(data)
            a = got.get(timeout=5)
        finally:
            src.stop()
    assert a.error is None and a.frame_id == sha256_file(sxm_dir / SCAN)[0]
