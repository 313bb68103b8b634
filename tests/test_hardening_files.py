"""Issue 15, file side: nothing stalls the agent, nothing outside its folders is read or written.

Each test reproduces one finding of the issue on real files, FIFOs, symlinks, sockets and a real
Agent, and checks the fix. Everything is written under tmp_path.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import stat
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zmq

from stm_agent.adapters.controller import ControllerSource
from stm_agent.adapters.files import Roots, read_regular, write_new
from stm_agent.adapters.folder import FolderSource
from stm_agent.adapters.nanonis_tcp import NanonisSource
from stm_agent.adapters.references import ReferenceEntry
from stm_agent.adapters.store import ResultStore
from stm_agent.adapters.sxm import MAX_DATA_BYTES, read_sxm
from stm_agent.agent.config import AcquisitionConfig, AgentConfig, ControllerConfig, NanonisConfig, NormaliseConfig
from stm_agent.agent.daemon import Agent
from stm_agent.agent.errors import (MissingChannelError, RefusedPathError, ReferenceLibraryError, ScanFormatError,
                                    ScanGeometryError)
from stm_agent.agent.normalise import crop_windows
from stm_agent.agent.pipeline import Recognizer
from tests.fake_nanonis import FakeNanonis
from tests.helpers import OTHER, REF_SCAN, SMALL, Running, arrival, make_cfg, sha, wait_until  # noqa: F401

SECRET = b"TOPSECRET-d41d8cd98f00b204e9800998ecf8427e"




def _arrivals(q: queue.Queue, n: int, timeout: float = 10.0) -> list:
    out, end = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


# ---------------------------------------------------------------- High 1, 2 and Medium 5: the folder
def test_fifo_dev_zero_and_outside_symlink_are_refused_and_later_scans_processed(tmp_path, refs, sxm_dir):
    """A FIFO named x.sxm, a symlink to /dev/zero and a symlink to a secret outside the folder were
    (1) blocking the folder thread for good, (2) read forever, (5) quoted in the error. Now each is
    refused at once as a recorded, published, counted error, and a real scan dropped after them is
    processed."""
    acq = tmp_path / "acq"
    acq.mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    cfg = make_cfg(tmp_path, refs, results_next_to_scans=True)  # where results go is what is tested
    run = Running(Agent(cfg))
    try:
        os.mkfifo(acq / "x.sxm")
        os.symlink("/dev/zero", acq / "zero.sxm")
        os.symlink(tmp_path / "secret.txt", acq / "secret.sxm")
        (acq / "inside.sxm").write_bytes(SECRET)  # a regular non-scan inside: read, rejected without echo
        time.sleep(0.5)
        shutil.copy(sxm_dir / SMALL, acq / "real.sxm")
        got = {}
        while len(got) < 5:
            m = run.next("frame.counts", timeout=15)
            got[m["name"]] = m
        assert got["real.sxm"]["status"] == "ok"
        for name, why in [("x.sxm", "FIFO"), ("zero.sxm", "outside the acquisition roots"),
                          ("secret.sxm", "outside the acquisition roots"), ("inside.sxm", "not a Nanonis .sxm")]:
            assert got[name]["status"] == "error" and why in got[name]["reason"], got[name]
        hb = run.next("agent.heartbeat")
        assert hb["sources"]["folder"]["refused"] == 3 and hb["pending"] == 0
    finally:
        run.stop()
    with ResultStore(tmp_path / "results.sqlite") as store:
        rows = store.latest(10)
        assert len(rows) == 5 and sum(r["status"] == "error" for r in rows) == 4
        dump = json.dumps(rows, default=str)
        assert "TOPSECRET" not in dump  # never echoed into the store
    for p in acq.glob("*.stm-agent.json"):
        assert b"TOPSECRET" not in p.read_bytes()


def test_reader_never_quotes_file_content(tmp_path):
    with pytest.raises(ScanFormatError) as e:
        read_sxm(SECRET + b"\n" * 100, name="x.sxm")
    assert "TOPSECRET" not in str(e.value) and "NANONIS_VERSION" in str(e.value)


def test_safe_read_refuses_fifo_device_symlink_out_and_oversize(tmp_path):
    roots = Roots([tmp_path / "in"], "test roots")
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / "f")
    t0 = time.monotonic()
    with pytest.raises(RefusedPathError, match="FIFO"):
        read_regular(tmp_path / "in" / "f", roots)
    with pytest.raises(RefusedPathError, match="character device"):
        read_regular("/dev/zero")  # no roots: an explicit path, still only regular files
    assert time.monotonic() - t0 < 2  # neither blocks
    (tmp_path / "out.txt").write_bytes(b"x")
    os.symlink(tmp_path / "out.txt", tmp_path / "in" / "link")
    with pytest.raises(RefusedPathError, match="through a symlink"):
        read_regular(tmp_path / "in" / "link", roots)
    with pytest.raises(RefusedPathError, match="outside"):
        read_regular(tmp_path / "in" / ".." / "out.txt", roots)
    (tmp_path / "in" / "big").write_bytes(b"y" * 100)
    with pytest.raises(RefusedPathError, match="more than the 99"):
        read_regular(tmp_path / "in" / "big", roots, max_bytes=99)
    os.symlink(tmp_path / "in" / "big", tmp_path / "in" / "ok_link")  # a symlink inside the roots is fine
    assert read_regular(tmp_path / "in" / "ok_link", roots)[0] == b"y" * 100


# ---------------------------------------------------------------- High 3: scan.saved paths
def _xpub(ctx):
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    return pub, f"tcp://127.0.0.1:{port}"


def test_scan_saved_outside_roots_is_refused_and_nothing_is_written_or_created(tmp_path, refs, sxm_dir):
    """scan.saved with ``acq/../outside/secret.sxm`` was hashed and written next to; a missing path
    under a new folder made the agent create ``new/deep/dirs``. Now both are refused (counted,
    recorded as errors), nothing is created or written outside the write roots, and a path inside
    the roots is processed."""
    ctx = zmq.Context.instance()
    pub, endpoint = _xpub(ctx)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.sxm").write_bytes(SECRET)
    (tmp_path / "acq").mkdir()
    inside = Path(shutil.copy(sxm_dir / SMALL, tmp_path / "acq" / "saved_scan.sxm"))
    cfg = make_cfg(tmp_path, refs, results_next_to_scans=True)  # where results go is what is tested
    cfg.controller.enabled, cfg.controller.endpoint = True, endpoint
    cfg.acquisition.catch_up = False
    before = sorted(p for p in tmp_path.rglob("*"))
    run = Running(Agent(cfg))
    try:
        assert wait_until(lambda: pub.poll(100) and pub.recv()[:1] == b"\x01", 10)  # the agent subscribed
        paths = [str(tmp_path / "acq" / ".." / "outside" / "secret.sxm"),
                 str(outside / "new" / "deep" / "dirs" / "anything.sxm"),
                 str(inside)]
        for p in paths:
            pub.send_multipart([b"scan.saved", json.dumps({"path": p}).encode()])
        got = [run.next("frame.counts", timeout=15) for _ in paths]
        by_path = {m["path"]: m for m in got}
        assert by_path[str(inside)]["status"] == "ok"
        for p in paths[:2]:
            assert by_path[p]["status"] == "error" and "refused" in by_path[p]["reason"]
            assert "outside the acquisition roots" in by_path[p]["reason"] and by_path[p]["files"] == []
        hb = run.next("agent.heartbeat")
        assert hb["sources"]["controller"]["refused"] == 2 and hb["refused_writes"] == 2
    finally:
        run.stop()
        pub.close(0)
    assert sorted(outside.rglob("*")) == [outside / "secret.sxm"]  # no dirs created, nothing written
    assert (outside / "secret.sxm").read_bytes() == SECRET
    new = set(tmp_path.rglob("*")) - set(before)
    assert not [p for p in new if p.is_relative_to(outside)]
    assert (tmp_path / "acq" / "saved_scan.stm-agent.json").is_file()  # the accepted scan: results beside it


# ---------------------------------------------------------------- High 4: planted symlinks, modes
def test_planted_symlinks_are_not_followed_and_results_are_not_world_readable(tmp_path, refs, sxm_dir):
    acq = tmp_path / "acq"
    acq.mkdir()
    victims = {}
    for name in ("real.stm-agent.json.tmp", "real.stm-agent.png", "real.stm-agent.json", ".real.stm-agent.json.tmp"):
        v = tmp_path / f"victim_{len(victims)}"
        v.write_bytes(b"precious")
        os.symlink(v, acq / name)
        victims[name] = v
    cfg = make_cfg(tmp_path, refs, results_next_to_scans=True)  # where results go is what is tested
    run = Running(Agent(cfg))
    try:
        shutil.copy(sxm_dir / SMALL, acq / "real.sxm")
        m = run.next("frame.counts", timeout=15)
        assert m["status"] == "ok" and len(m["files"]) == 2
    finally:
        run.stop()
    for v in victims.values():
        assert v.read_bytes() == b"precious"  # no target overwritten
    for f in ("real.stm-agent.json", "real.stm-agent.png"):
        st = os.lstat(acq / f)
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o007 == 0, oct(st.st_mode)  # replaced the link; 0640
    json.loads((acq / "real.stm-agent.json").read_text())
    assert not [p for p in acq.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]  # no temp left


def test_spooled_payload_is_not_world_readable(tmp_path, refs, sxm_dir):

    cfg = make_cfg(tmp_path, refs, results_next_to_scans=True)  # where results go is what is tested
    cfg.acquisition.enabled = False
    agent = Agent(cfg)
    try:
        agent.submit(arrival(sxm_dir / SMALL, source="controller", payload=True))
        (spooled,) = (tmp_path / "spool").glob("*.sxm")
        assert os.stat(spooled).st_mode & 0o007 == 0
    finally:
        agent.store.close()


def test_write_new_refuses_outside_roots_and_does_not_create_folders(tmp_path):
    roots = Roots([tmp_path / "out"], "write roots")
    with pytest.raises(RefusedPathError, match="outside the write roots"):
        write_new(tmp_path / "elsewhere", "a.json", b"{}", roots=roots, make_dirs=True)
    with pytest.raises(RefusedPathError, match="does not exist"):
        write_new(tmp_path / "out" / "sub", "a.json", b"{}", roots=roots)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "out").exists()
    p = write_new(tmp_path / "out" / "sub", "a.json", b"{}", roots=roots, make_dirs=True)
    assert p.read_bytes() == b"{}"
    with pytest.raises(RefusedPathError, match="plain file name"):
        write_new(tmp_path / "out", "../x", b"", roots=roots)


# ---------------------------------------------------------------- Medium 6: sizes bounded first
def _header(b: bytes, key: bytes, value: bytes) -> bytes:
    return re.sub(rb"(:" + key + rb":\n)[^\n]*", lambda m: m.group(1) + value, b, count=1)


def test_tiny_scan_range_gives_a_typed_error_without_allocating(tmp_path, refs, sxm_dir):
    """SCAN_RANGE 1e-11 m took 3.5 GB and 11 s (unbounded crop window in pixels)."""
    cfg = AgentConfig(references={"folder": str(refs)})
    rec = Recognizer.from_config(cfg)
    scan = read_sxm(_header((sxm_dir / REF_SCAN).read_bytes(), b"SCAN_RANGE", b"1.000000E-11 1.000000E-11"), name="tiny.sxm")
    tracemalloc.start()
    try:
        with pytest.raises(ScanGeometryError, match="reference window"):
            rec.recognise(scan)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, peak
    with pytest.raises(ScanGeometryError):
        crop_windows(np.zeros((8, 8), np.float32), np.array([[4.0, 4.0]]), 2.0, (1e-300, 1e-300), 64)


def test_huge_and_headerless_files_are_refused_before_reading(tmp_path, sxm_dir):
    """A 2 GiB headerless file was read whole before the magic check; a header promising more than
    the bound is refused from the header. Sparse files: no disk used."""
    huge, junk = tmp_path / "huge.sxm", tmp_path / "junk.sxm"
    for p, size in ((huge, 2 << 30), (junk, MAX_DATA_BYTES // 2)):
        with open(p, "wb") as f:
            f.truncate(size)
    big = tmp_path / "big.sxm"
    b = (sxm_dir / SMALL).read_bytes()
    head = _header(b[:b.index(b"\x1a\x04") + 2], b"SCAN_PIXELS", b"16384 16384")
    with open(big, "wb") as f:
        f.write(head)
        f.truncate(len(head) + (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ScanFormatError, match="2147483648 bytes, more than"):
            read_sxm(huge)  # the descriptor's size, before any read
        with pytest.raises(ScanFormatError, match="NANONIS_VERSION"):
            read_sxm(junk)  # 512 MiB of zeros: the magic is checked on the first block
        with pytest.raises(ScanFormatError, match="header promises .* more than"):
            read_sxm(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


# ---------------------------------------------------------------- 11: Nanonis TCP
def _nanonis(port, got, roots, **kw):
    cfg = NanonisConfig(enabled=True, port=port, wait_timeout_s=kw.pop("wait_timeout_s", 0.2), reconnect_s=0.1)
    return NanonisSource(cfg, got.put, roots=roots, complete_wait_s=1.0, **kw)


def test_nanonis_fifo_and_outside_paths_do_not_hang_the_thread(tmp_path, sxm_dir):
    acq = tmp_path / "acq"
    acq.mkdir()
    os.mkfifo(acq / "pipe.sxm")
    good = Path(shutil.copy(sxm_dir / SMALL, acq / "Scan_001.sxm"))
    got: queue.Queue = queue.Queue()
    with FakeNanonis(chunk=1000) as fake:
        src = _nanonis(fake.port, got, Roots([acq], "acquisition roots"))
        src.start()
        try:
            fake.push_path(str(acq / "pipe.sxm"))
            fake.push_path("/etc/hostname")
            fake.push_path(str(good))
            items = _arrivals(got, 3)
        finally:
            src.stop()
    assert len(items) == 3, items
    assert "FIFO" in items[0].error and "outside the acquisition roots" in items[1].error
    assert items[2].error is None and items[2].frame_id == sha(good)
    assert src.stats()["refused"] == 2


def test_nanonis_instant_timeouts_back_off_and_huge_errors_are_cut(tmp_path, caplog):
    got: queue.Queue = queue.Queue()
    with FakeNanonis(chunk=4096, chunk_delay_s=0) as fake:
        fake.push_error("E" * 500_000)
        for _ in range(100_000):
            fake.push_timeout()  # every WaitEndOfScan answered "timed out" at once
        src = _nanonis(fake.port, got, None, wait_timeout_s=1.0)
        with caplog.at_level(logging.INFO, logger="stm_agent.adapters.nanonis_tcp"):
            src.start()
            time.sleep(3.0)
            src.stop()
        n = len(fake.requests)
    # without backoff: thousands of requests a second; with it: 0.05, 0.1, ... up to 1 s pauses
    assert n < 20, n
    assert src.stats()["backoffs"] >= 3
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


# ---------------------------------------------------------------- Low 12: typed errors at their cause
@pytest.mark.parametrize("key,value", [(b"SCAN_RANGE", b"1e300 1e300"), (b"SCAN_RANGE", b"1e-300 1e-9"),
                                       (b"SCAN_OFFSET", b"1e300 0")])
def test_extreme_header_values_are_typed_errors(sxm_dir, key, value):
    with pytest.raises(ScanFormatError, match=key.decode()):
        read_sxm(_header((sxm_dir / SMALL).read_bytes(), key, value), name="x.sxm")


def test_missing_channel_is_typed_and_still_a_key_error(refs, sxm_dir):
    scan = read_sxm((sxm_dir / REF_SCAN).read_bytes().replace(b"\tZ\t", b"\tY\t", 1), name="renamed.sxm")
    rec = Recognizer.from_config(AgentConfig(references={"folder": str(refs)}))
    with pytest.raises(MissingChannelError, match="renamed.sxm: no channel 'Z'") as e:
        rec.recognise(scan)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ScanFormatError)


def test_recognize_goes_on_after_a_bad_file(tmp_path, refs, sxm_dir):
    from typer.testing import CliRunner

    from stm_agent.agent.cli import app

    bad = tmp_path / "bad.sxm"
    bad.write_bytes(_header((sxm_dir / SMALL).read_bytes(), b"SCAN_RANGE", b"1e-11 1e-11"))
    good = Path(shutil.copy(sxm_dir / REF_SCAN, tmp_path / "good.sxm"))
    res = CliRunner().invoke(app, ["recognize", str(bad), str(good), "--refs", str(refs), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert (tmp_path / "o" / "good.stm-agent.json").is_file()
    assert not (tmp_path / "o" / "bad.stm-agent.json").exists()


# ---------------------------------------------------------------- Low 16: references, model pin
def test_pickled_reference_is_a_clear_error(tmp_path):
    p = tmp_path / "evil.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    e = ReferenceEntry(species="x", path=p, pixel_size_nm=(0.1, 0.1), extent_nm=1.0, provenance={})
    with pytest.raises(ReferenceLibraryError, match="pickled"):
        e.load()


def test_catch_up_with_a_fifo_already_there(tmp_path, sxm_dir):
    """Files present at start go through the same safe checks: the FIFO is refused once (also after
    a restart, when the store knows its refusal), the scan beside it is handed on."""
    acq = tmp_path / "acq"
    acq.mkdir()
    os.mkfifo(acq / "a.sxm")
    shutil.copy(sxm_dir / SMALL, acq / "b.sxm")
    recorded: set[str] = set()
    for run in range(2):
        q: queue.Queue = queue.Queue()
        src = FolderSource(AcquisitionConfig(folder=acq, settle_s=0.1), known=recorded.__contains__, out=q,
                           check_interval_s=0.05)
        src.start()
        try:
            items = _arrivals(q, 2, timeout=5 if run == 0 else 1.5)
        finally:
            src.stop()
        if run == 0:
            by_name = {a.path.name: a for a in items}
            assert "FIFO" in by_name["a.sxm"].error and by_name["b.sxm"].error is None
            assert by_name["b.sxm"].data == (sxm_dir / SMALL).read_bytes()  # read once, handed on
            recorded |= {a.frame_id for a in items}
            assert src.stats()["refused"] == 1
        else:
            assert items == [] and src.stats()["refused"] == 0
