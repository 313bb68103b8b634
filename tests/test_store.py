"""SQLite results store: idempotent records keyed by sha256, errors with reasons, WAL mode.

Results come from the real pipeline run on a real scan (../shared/data/sxm).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from stm_agent.adapters.scanfile import read_scan
from stm_agent.adapters.store import ResultStore
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.errors import StoreError
from stm_agent.agent.pipeline import Recognizer

from tests.helpers import build_refs

SCAN = "au111_adsorbates_10nm_256_up.sxm"


@pytest.fixture(scope="module")
def real_results(sxm_dir: Path, tmp_path_factory) -> tuple[AgentConfig, list]:
    """Recognise two real scans with a one-species library picked from the first."""
    refs = build_refs(sxm_dir, tmp_path_factory.mktemp("refs"))
    cfg = AgentConfig(references={"folder": str(refs)})
    rec = Recognizer.from_config(cfg)
    other = read_scan(sxm_dir / "cu111_tcne_molecules_6nm_256_up.sxm")
    return cfg, [rec.recognise(read_scan(sxm_dir / SCAN)), rec.recognise(other)]


def test_record_roundtrip_and_idempotent(tmp_path, real_results, sxm_dir):
    cfg, (res, res2) = real_results
    assert res.frame_id == hashlib.sha256((sxm_dir / SCAN).read_bytes()).hexdigest()
    store = ResultStore(tmp_path / "sub" / "results.sqlite")  # folder is created
    assert not store.has(res.frame_id)
    assert store.record(res, sxm_dir / SCAN, cfg.digest()) is True
    assert store.has(res.frame_id) and store.count() == 1
    row = store.get(res.frame_id)
    assert row["status"] == "ok" and row["reason"] is None
    assert row["counts"] == res.counts and row["n_objects"] == res.n_objects == sum(res.counts.values())
    assert row["counts"].keys() == {"adsorbate", "other"}
    assert len(row["detections"]) == len(res.detections) > 0
    assert row["detections"][0]["bbox_px"] == list(res.detections[0].bbox_px)
    assert row["encoder"]["id"] == res.encoder["id"]
    assert row["scan"]["pixels"] == [256, 256]
    assert row["config_digest"] == cfg.digest()
    assert row["path"] == str(sxm_dir / SCAN)
    assert set(row["timings"]) >= {"flatten", "segment", "total"}

    # Same frame again (even with different content in the result): ignored, first record kept.
    res.counts = {"adsorbate": 999, "other": 0}
    try:
        assert store.record(res, "elsewhere.sxm", "other-digest") is False
    finally:
        res.counts = row["counts"]
    assert store.count() == 1
    assert store.get(res.frame_id)["counts"] == row["counts"]
    assert store.get(res.frame_id)["path"] == str(sxm_dir / SCAN)

    assert store.record(res2, sxm_dir / "cu111_tcne_molecules_6nm_256_up.sxm", cfg.digest())
    assert store.count() == 2 and store.count("ok") == 2 and store.count("error") == 0
    assert [r["frame_id"] for r in store.latest(2)] == [res2.frame_id, res.frame_id]
    store.close()
    store.close()  # idempotent


def test_errors_are_recorded_with_reason(tmp_path, sxm_dir, real_results):
    cfg, (res, _) = real_results
    bad = sxm_dir / "bad" / "not_an_sxm.sxm"
    before = bad.read_bytes()
    fid = hashlib.sha256(before).hexdigest()
    with ResultStore(tmp_path / "r.sqlite") as store:
        assert store.record_error(fid, bad, "not a Nanonis .sxm scan", config_digest=cfg.digest())
        assert not store.record_error(fid, bad, "another reason")  # idempotent
        row = store.get(fid)
        assert row["status"] == "error" and row["reason"] == "not a Nanonis .sxm scan"
        assert row["counts"] == {} and row["n_objects"] == 0 and row["source"] == str(bad)
        assert store.count("error") == 1 and store.get("0" * 64) is None
    assert bad.read_bytes() == before  # the store never touches the file


def test_wal_mode_persistence_and_concurrent_reader(tmp_path, real_results, sxm_dir):
    cfg, (res, res2) = real_results
    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    assert store.journal_mode() == "wal"
    store.record(res, sxm_dir / SCAN, cfg.digest())
    # Another process/connection reads while the agent holds the store open.
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (fid, counts), = other.execute("SELECT frame_id, counts FROM frames").fetchall()
    assert fid == res.frame_id and json.loads(counts) == res.counts
    other.close()
    store.close()
    with ResultStore(path) as again:  # reopened: still knows the frame, schema kept
        assert again.has(res.frame_id) and not again.has(res2.frame_id)
        assert again.count() == 1


def test_non_finite_values_stored_as_null(tmp_path, real_results, sxm_dir):
    cfg, (res, _) = real_results
    scan = dict(res.scan)
    res.scan["bias_V"] = float("nan")
    try:
        with ResultStore(tmp_path / "r.sqlite") as store:
            store.record(res, sxm_dir / SCAN, cfg.digest())
            raw = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT scan FROM frames").fetchone()[0]
            assert "NaN" not in raw
            assert store.get(res.frame_id)["scan"]["bias_V"] is None
    finally:
        res.scan = scan


def test_not_a_database_is_a_typed_error(tmp_path, sxm_dir):
    fake = tmp_path / "results.sqlite"
    fake.write_bytes((sxm_dir / "bad" / "not_an_sxm.sxm").read_bytes())
    with pytest.raises(StoreError) as e:
        ResultStore(fake)
    assert str(fake) in str(e.value) and "cannot open" in str(e.value)
