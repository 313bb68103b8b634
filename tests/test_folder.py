"""Folder source: a scan is handed on only when complete, once per content (sha256), with real
files from ../shared/data/sxm copied into a watched temporary folder."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import time
from pathlib import Path

import pytest

from stm_agent.adapters.folder import Arrival, FolderSource
from stm_agent.agent.config import AcquisitionConfig

GOOD = "au111_adsorbates_10nm_256_up.sxm"
SMALL = "porphyrin_dimer_96_up_7ch.sxm"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def make_source(tmp_path):
    started: list[FolderSource] = []

    def make(known=lambda fid: False, **over) -> FolderSource:
        opts = {"folder": tmp_path / "acq", "settle_s": 0.3, "complete_timeout_s": 30.0} | over
        src = FolderSource(AcquisitionConfig(**opts), known=known, check_interval_s=0.05)
        src.start()
        started.append(src)
        return src

    yield make
    for s in started:
        s.stop()


def get(src: FolderSource, timeout: float = 5.0) -> Arrival:
    try:
        return src.queue.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"nothing handed on within {timeout} s; pending {src.pending()}")


def nothing_more(src: FolderSource, wait: float = 0.6) -> None:
    time.sleep(wait)
    assert src.queue.empty(), f"unexpected arrival {src.queue.get_nowait()}"


def test_slow_chunked_copy_is_read_only_when_complete(make_source, sxm_dir):
    src = make_source()
    data = (sxm_dir / GOOD).read_bytes()
    dest = src.folder / "slow.sxm"
    step = len(data) // 20 + 1
    with open(dest, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            time.sleep(0.05)  # longer than the check interval: the checker sees every partial size
            if i + step < len(data):
                assert src.queue.empty(), f"handed on after {i + step} of {len(data)} bytes"
    item = get(src)
    assert item.error is None and item.path == dest
    assert item.frame_id == hashlib.sha256(data).hexdigest() and item.size == len(data)
    nothing_more(src)  # the many modified events of the copy give exactly one arrival


def test_file_written_line_by_line(make_source, sxm_dir):
    """The header arrives line by line (no size known yet), then the data in pieces."""
    src = make_source(settle_s=0.1)  # shorter than the pauses: size stability alone would fire
    data = (sxm_dir / SMALL).read_bytes()
    head_end = data.index(b"\x1a\x04") + 2
    dest = src.folder / "lines.sxm"
    with open(dest, "wb") as f:
        lines = data[:head_end].splitlines(keepends=True)
        for k, line in enumerate(lines):
            f.write(line)
            f.flush()
            if k % 25 == 0:
                time.sleep(0.15)
                assert src.queue.empty(), f"handed on with only {k + 1} header lines"
        for i in range(head_end, len(data), 200_000):
            f.write(data[i:i + 200_000])
            f.flush()
            time.sleep(0.15)
            if i + 200_000 < len(data):
                assert src.queue.empty()
    item = get(src)
    assert item.error is None and item.frame_id == hashlib.sha256(data).hexdigest()


def test_moved_in_and_duplicate_content(make_source, sxm_dir, tmp_path):
    src = make_source()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(sxm_dir / GOOD, outside / "Image_001.sxm")
    os.rename(outside / "Image_001.sxm", src.folder / "Image_001.sxm")  # moved in (rename)
    item = get(src)
    assert item.path.name == "Image_001.sxm" and item.frame_id == sha(sxm_dir / GOOD)
    shutil.copy(sxm_dir / GOOD, src.folder / "copy_of_001.sxm")  # same bytes, new name
    shutil.copy(sxm_dir / SMALL, src.folder / "Image_002.SXM")  # patterns are case-insensitive
    item2 = get(src)
    assert item2.path.name == "Image_002.SXM" and item2.frame_id == sha(sxm_dir / SMALL)
    nothing_more(src)
    (src.folder / "notes.txt").write_text("not a scan")
    (src.folder / "Image_001.stm-agent.json").write_text("{}")  # our own result files
    nothing_more(src, 0.5)



def test_catch_up(tmp_path, sxm_dir):
    acq = tmp_path / "acq"
    acq.mkdir()
    shutil.copy(sxm_dir / GOOD, acq / "old_done.sxm")
    shutil.copy(sxm_dir / SMALL, acq / "old_new.sxm")
    done = {sha(acq / "old_done.sxm")}
    src = FolderSource(AcquisitionConfig(folder=acq, settle_s=0.3), known=done.__contains__, check_interval_s=0.05)
    src.start()
    try:
        item = get(src)
        assert item.path.name == "old_new.sxm" and item.catch_up and item.error is None
        nothing_more(src)
    finally:
        src.stop()
    # catch_up: false ignores what was there, but still sees new files
    src = FolderSource(AcquisitionConfig(folder=acq, settle_s=0.3, catch_up=False), check_interval_s=0.05)
    src.start()
    try:
        nothing_more(src)
        shutil.copy(sxm_dir / "hbn_point_defect_96x100_down.sxm", acq / "fresh.sxm")
        assert get(src).path.name == "fresh.sxm"
    finally:
        src.stop()


def test_incomplete_file_reported_after_timeout(make_source, sxm_dir):
    """A real truncated scan (2 bytes short) looks like a file still being written: it is never
    read as complete, and after complete_timeout_s it is handed on as an error."""
    src = make_source(complete_timeout_s=1.0)
    bad = sxm_dir / "bad" / "short2bytes_porphyrin_brstm_112_down.sxm"
    shutil.copy(bad, src.folder / "short.sxm")
    time.sleep(0.5)
    assert src.queue.empty()
    item = get(src)
    assert item.error is not None and item.error.startswith("incomplete after 1 s")
    assert f"{bad.stat().st_size} of the {bad.stat().st_size + 2} bytes" in item.error
    assert item.frame_id == sha(bad)
    assert (src.folder / "short.sxm").read_bytes() == bad.read_bytes()  # never deleted or moved


def test_invalid_header_is_handed_to_the_reader(make_source, sxm_dir):
    """A file that can never become a valid .sxm is handed on once stable (the reader says why)."""
    src = make_source()
    shutil.copy(sxm_dir / "bad" / "grid_3ds_misnamed.sxm", src.folder / "grid.sxm")
    item = get(src)
    assert item.error is None and item.path.name == "grid.sxm"


def test_non_sxm_waits_for_stable_size(make_source, labelled_dir):
    src = make_source(patterns=["*.png"], settle_s=1.5)
    png = labelled_dir / "fhpb" / "fhpb_testset_0.png"
    data = png.read_bytes()
    dest = src.folder / "img.png"
    with open(dest, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.4)  # well below settle_s
        assert src.queue.empty()
        f.write(data[len(data) // 2:])
    item = get(src)
    assert item.frame_id == hashlib.sha256(data).hexdigest()


def test_polling_observer(make_source, sxm_dir):
    src = make_source(polling=True, poll_interval_s=0.2)
    assert type(src._observer).__name__ == "PollingObserver"
    shutil.copy(sxm_dir / SMALL, src.folder / "net.sxm")
    assert get(src).frame_id == sha(sxm_dir / SMALL)


def test_dead_observer_is_restarted(make_source, sxm_dir):
    src = make_source()
    dead = src._observer
    dead.stop()
    dead.join(5)
    shutil.copy(sxm_dir / SMALL, src.folder / "while_dead.sxm")  # arrives while nobody watches
    end = time.monotonic() + 5
    while src.restarts == 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert src.restarts == 1 and src.observer_alive and src._observer is not dead
    assert get(src).path.name == "while_dead.sxm"  # found by the rescan after the restart
    shutil.copy(sxm_dir / GOOD, src.folder / "after.sxm")
    assert get(src).path.name == "after.sxm"  # and the new observer sees new files
