"""Batch reprocessing of archives: the real shared scans (good and broken) give the daemon's results
row for row, exactly once per scan, resumable after a kill, on local processes and on a Dask
LocalCluster."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stm_agent.adapters.arrival import Arrival
from stm_agent.adapters.store import ResultStore
from stm_agent.agent.batch import STORE_NAME, BatchError, find_scans, run_batch
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.daemon import Agent

REF_SCAN = "au111_adsorbates_10nm_256_up.sxm"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


SXM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sxm"


def _cfg(tmp_path: Path, refs: Path) -> AgentConfig:
    return AgentConfig(references={"folder": str(refs)}, results={"store": str(tmp_path / "daemon.sqlite"),
                                                                  "out_dir": str(tmp_path / "daemon_out")},
                       publish={"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0, "query_endpoint": None},
                       acquisition={"enabled": False, "folder": str(SXM.resolve())})  # the daemon's read root


def _rows(store_path: Path) -> dict[str, dict]:
    with ResultStore(store_path) as st:
        n = st.count()
        rows = st.latest(n)
    assert len({r["frame_id"] for r in rows}) == len(rows)
    return {r["frame_id"]: r for r in rows}


def _all_scans(sxm_dir: Path) -> list[Path]:
    return sorted(sxm_dir.rglob("*.sxm"))


@pytest.fixture(scope="module")
def daemon_rows(sxm_dir, refs, tmp_path_factory) -> dict[str, dict]:
    """Every shared scan (26 good + 7 broken) through the daemon's own worker path."""
    tmp = tmp_path_factory.mktemp("daemon")
    agent = Agent(_cfg(tmp, refs), sources=[])
    try:
        for p in _all_scans(sxm_dir):
            now = datetime.now(timezone.utc)
            agent.submit(Arrival(path=p, frame_id=_sha(p), size=p.stat().st_size, received_at=now,
                                 received_mono=time.monotonic()))
        while agent.process_next() is not None:
            pass
    finally:
        agent.publisher.close()
        agent.store.close()
    return _rows(tmp / "daemon.sqlite")


def _same(batch: dict[str, dict], daemon: dict[str, dict]) -> None:
    assert batch.keys() == daemon.keys()
    for fid, d in daemon.items():
        b = batch[fid]
        assert (b["status"], b["reason"], b["counts"], b["n_objects"]) == \
            (d["status"], d["reason"], d["counts"], d["n_objects"]), d["name"]
        assert b["detections"] == d["detections"], d["name"]
        assert b["source"] == "batch"


def test_batch_equals_daemon_row_for_row(sxm_dir, refs, daemon_rows, tmp_path):
    out = tmp_path / "out"
    rep = run_batch([sxm_dir], out, _cfg(tmp_path, refs), workers=2)
    scans = _all_scans(sxm_dir)
    assert rep.found == len(scans) == 33
    assert rep.processed == 33 and rep.errors == 8 and rep.already == 0  # 7 broken + the all-NaN scan
    batch = _rows(out / STORE_NAME)
    _same(batch, daemon_rows)
    ok = [r for r in daemon_rows.values() if r["status"] == "ok"]
    assert sum(r["counts"].get("adsorbate", 0) for r in ok) >= 1
    # result files only under --out, mirroring the archive's sub-folders; nothing new next to the scans
    assert (out / "frames" / "sxm" / f"{Path(REF_SCAN).stem}.stm-agent.png").is_file()
    assert (out / "frames" / "sxm" / "bad" / "not_an_sxm.stm-agent.json").is_file()
    written = {Path(f) for r in batch.values() for f in r["message"]["files"]}
    assert written == {p for p in (out / "frames").rglob("*") if p.is_file()}
    assert len(written) == 33 + 25  # a JSON per scan, an overlay per ok scan
    # a second run over the same archive does nothing
    again = run_batch([sxm_dir, sxm_dir / REF_SCAN], out, _cfg(tmp_path, refs), workers=0)
    assert (again.processed, again.already, again.found) == (0, 33, 33)


def test_killed_batch_resumes_and_processes_every_scan_once(sxm_dir, refs, daemon_rows, tmp_path):
    """SIGKILL in the middle (after the 5th result is recorded, more in flight), then restart."""
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from stm_agent.agent.batch import run_batch\n"
        "from stm_agent.agent.config import AgentConfig\n"
        "cfg = AgentConfig(references={'folder': sys.argv[3]})\n"
        "def kill(name, done, total):\n"
        "    if done == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "run_batch([sys.argv[1]], sys.argv[2], cfg, workers=1, on_progress=kill)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(sxm_dir), str(out), str(refs)], timeout=120)
    assert p.returncode == -9
    first = _rows(out / STORE_NAME)
    assert len(first) == 5
    rep = run_batch([sxm_dir], out, _cfg(tmp_path, refs), workers=0)
    assert (rep.already, rep.processed) == (5, 28)
    _same(_rows(out / STORE_NAME), daemon_rows)  # each scan once, the daemon's results


def test_stop_then_resume_in_process(sxm_dir, refs, tmp_path):
    import threading

    stop = threading.Event()
    out = tmp_path / "out"
    r1 = run_batch([sxm_dir], out, _cfg(tmp_path, refs), workers=0,
                   stop=stop, on_progress=lambda n, done, total: done >= 10 and stop.set())
    assert r1.interrupted and 10 <= r1.processed < 33
    r2 = run_batch([sxm_dir], out, _cfg(tmp_path, refs), workers=0)
    assert not r2.interrupted and r2.already == r1.processed and r1.processed + r2.processed == 33
    assert len(_rows(out / STORE_NAME)) == 33


def test_one_writer_and_clear_errors(sxm_dir, refs, tmp_path):
    from stm_agent.agent.batch import _OutLock

    out = tmp_path / "out"
    held = _OutLock(out)
    try:
        with pytest.raises(BatchError, match="another batch"):
            run_batch([sxm_dir / REF_SCAN], out, _cfg(tmp_path, refs), workers=0)
    finally:
        held.release()
    with pytest.raises(BatchError, match="no such file"):
        find_scans([tmp_path / "nope"], out)
    with pytest.raises(BatchError, match="no scan"):
        run_batch([refs], out, _cfg(tmp_path, refs), workers=0)


def test_dask_local_cluster(sxm_dir, refs, daemon_rows, tmp_path):
    import distributed  # the [batch] extra, installed by the test command

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        out = tmp_path / "out"
        rep = run_batch([sxm_dir], out, _cfg(tmp_path, refs), dask_address=cluster.scheduler_address)
    assert rep.processed == 33
    _same(_rows(out / STORE_NAME), daemon_rows)


def test_cli_batch_and_recognize_folder(sxm_dir, refs, tmp_path):
    from stm_agent.agent.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["batch", str(sxm_dir / "bad"), "--out", str(out), "--workers", "0",
                              "--refs", str(refs)])
    assert res.exit_code == 0, res.output
    assert "processed now" in res.output and "7" in res.output
    res = runner.invoke(app, ["batch", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code == 2 and "no such file or folder" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["batch", str(sxm_dir), "--out", str(out), "--dask", "tcp://127.0.0.1:9"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    # recognize accepts a folder and ends with one summary row per scan
    folder = tmp_path / "some"
    folder.mkdir()
    for name in (REF_SCAN, "cu111_tcne_molecules_6nm_256_up.sxm"):
        os.symlink(sxm_dir / name, folder / name)
    res = runner.invoke(app, ["recognize", str(folder), "--refs", str(refs), "--out", str(tmp_path / "rec")],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "2 scans" in res.output and "adsorbate" in res.output
    assert "au111_adsorbates_10nm_256_up.sxm" in res.output.split("2 scans")[1]
