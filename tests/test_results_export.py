"""Results export (CSV / JSON / Parquet, per frame and per object) and the `results export` /
`status` commands, on the SQLite store the real agent wrote on real scans."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys

import pytest
import typer
from typer.testing import CliRunner

from stm_agent.adapters.tables import ExportError, export_results, read_rows
from stm_agent.adapters.query import QueryServer
from stm_agent.adapters.store import ResultStore
from stm_agent.agent.cli_service import results_app, status
from stm_agent.agent.errors import StoreError
from tests.helpers import BAD, REF_SCAN, SMALL, free_port, run_real_agent, sha

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def real(sxm_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("export")
    run = run_real_agent(work, sxm_dir, [REF_SCAN, SMALL, BAD])
    with ResultStore(run["store"]) as store:
        rows = {r["frame_id"]: r for r in store.latest(100)}
    assert len(rows) == 3
    return {"store": run["store"], "rows": rows, "work": work}


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(results_app, name="results")
    app.command()(status)
    return app


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_frames_table_counts_and_densities_equal_the_store(real, sxm_dir):
    columns, rows = read_rows(real["store"], "frames")
    assert columns[:3] == ["frame_id", "name", "source"] and columns[-1] == "config_digest"
    assert {"count_adsorbate", "count_other", "density_adsorbate_per_nm2", "density_other_per_nm2"} <= set(columns)
    assert [r["frame_id"] for r in rows] == sorted(real["rows"], key=lambda f: real["rows"][f]["processed_at"])
    for r in rows:
        st = real["rows"][r["frame_id"]]
        assert set(r) == set(columns)
        assert (r["status"], r["reason"], r["n_objects"], r["config_digest"], r["path"]) == \
            (st["status"], st["reason"], st["n_objects"], st["config_digest"], st["path"])
        if st["status"] == "error":
            assert r["count_adsorbate"] is None and r["density_adsorbate_per_nm2"] is None
            continue
        w, h = st["scan"]["range_nm"]
        assert r["area_nm2"] == pytest.approx(w * h) and [r["pixels_x"], r["pixels_y"]] == st["scan"]["pixels"]
        assert r["bias_V"] == st["scan"]["bias_V"] and r["encoder"] == st["encoder"]["name"]
        assert r["channel"] == st["scan"]["channel"] == "Z"  # the channel analysed (channel: auto)
        for sp, n in st["counts"].items():
            assert r[f"count_{sp}"] == n
            assert r[f"density_{sp}_per_nm2"] == pytest.approx(n / (w * h))
    ref = next(r for r in rows if r["frame_id"] == sha(sxm_dir / REF_SCAN))
    assert ref["count_adsorbate"] >= 1 and ref["area_nm2"] == pytest.approx(100.0, rel=1e-3)  # 10 nm x 10 nm
    assert next(r for r in rows if r["frame_id"] == sha(sxm_dir / BAD))["status"] == "error"


def test_objects_table_has_one_row_per_detection(real):
    columns, rows = read_rows(real["store"], "objects")
    assert "score_adsorbate" in columns and "touches_edge" in columns
    total = sum(len(r["detections"]) for r in real["rows"].values())
    assert total > 0 and len(rows) == total
    for r in rows:
        d = real["rows"][r["frame_id"]]["detections"][r["object"]]
        assert (r["species"], r["similarity"], r["touches_edge"], r["area_nm2"]) == \
            (d["species"], d["similarity"], d["touches_edge"], d["area_nm2"])
        assert [r["centroid_x_nm"], r["centroid_y_nm"]] == d["centroid_nm"]
        assert [r["bbox_x_px"], r["bbox_y_px"], r["bbox_w_px"], r["bbox_h_px"]] == d["bbox_px"]
        assert r["score_adsorbate"] == d["scores"]["adsorbate"]
    counted = sum(1 for r in rows if not r["touches_edge"])
    assert counted == sum(r["n_objects"] for r in real["rows"].values())


@pytest.mark.parametrize("table", ["frames", "objects"])
def test_three_formats_round_trip(real, tmp_path, table):
    import pyarrow.parquet as pq

    before = digest(real["store"])
    columns, rows = read_rows(real["store"], table)
    assert export_results(real["store"], tmp_path / "t.json", "json", table) == len(rows)
    assert json.loads((tmp_path / "t.json").read_text()) == rows

    assert export_results(real["store"], tmp_path / "t.parquet", "parquet", table) == len(rows)
    pt = pq.read_table(tmp_path / "t.parquet")
    assert pt.column_names == columns and pt.to_pylist() == rows

    assert export_results(real["store"], tmp_path / "t.csv", "csv", table) == len(rows)
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == columns
    assert back == [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
    assert digest(real["store"]) == before  # read-only


def test_export_errors(real, tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="no results database"):
        export_results(tmp_path / "missing.sqlite", tmp_path / "x.csv", "csv", "frames")
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError):
        export_results(tmp_path / "junk.sqlite", tmp_path / "x.csv", "csv", "frames")
    with pytest.raises(ExportError, match="unknown format"):
        export_results(real["store"], tmp_path / "x.xlsx", "xlsx", "frames")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="unknown table"):
        export_results(real["store"], tmp_path / "x.csv", "csv", "molecules")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="Parquet is binary"):
        export_results(real["store"], io.StringIO(), "parquet", "frames")
    with pytest.raises(ExportError, match="cannot write"):
        export_results(real["store"], tmp_path / "no" / "such" / "dir.csv", "csv", "frames")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ExportError, match=r'pip install "stm-agent\[parquet\]"'):
        export_results(real["store"], tmp_path / "x.parquet", "parquet", "frames")


# ---------------------------------------------------------------------- CLI
def write_cfg(tmp_path, store, query_endpoint) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(f"results:\n  store: {store}\npublish:\n  query_endpoint: {query_endpoint}\n")
    return str(p)


def test_cli_results_export(real, tmp_path, cli):
    cfg = write_cfg(tmp_path, real["store"], "null")
    res = CliRunner().invoke(cli, ["results", "export", "--config", cfg, "--format", "csv"], env=ENV)
    assert res.exit_code == 0, res.output
    back = list(csv.DictReader(io.StringIO(res.stdout)))
    _, rows = read_rows(real["store"], "frames")
    assert [b["frame_id"] for b in back] == [r["frame_id"] for r in rows]
    assert [b["count_adsorbate"] for b in back] == ["" if r["count_adsorbate"] is None else str(r["count_adsorbate"])
                                                   for r in rows]

    out = tmp_path / "objects.json"
    res = CliRunner().invoke(cli, ["results", "export", "--store", str(real["store"]), "--table", "objects",
                                   "--format", "json", "--out", str(out)], env=ENV)
    assert res.exit_code == 0, res.output
    n = len(json.loads(out.read_text()))
    assert n > 0 and f"exported {n} objects rows to {out}" in res.stderr

    res = CliRunner().invoke(cli, ["results", "export", "--config", cfg, "--format", "parquet"], env=ENV)
    assert res.exit_code == 2 and "Parquet is binary" in res.stderr
    res = CliRunner().invoke(cli, ["results", "export", "--config", cfg, "--format", "xml"], env=ENV)
    assert res.exit_code == 2 and "xml" in res.output + res.stderr  # rejected by the option's choices


def test_cli_status_without_agent_falls_back_to_the_store(real, tmp_path, cli):
    ep = f"tcp://127.0.0.1:{free_port()}"  # nobody answers here
    cfg = write_cfg(tmp_path, real["store"], ep)
    res = CliRunner().invoke(cli, ["status", "--config", cfg, "--timeout", "0.3"], env=ENV)
    assert res.exit_code == 1, res.output
    assert "no agent answered" in res.stdout and "no answer within 300 ms" in res.stdout
    assert "2 frames ok, 1 errors, 0 pending" in res.stdout
    assert "not a Nanonis .sxm scan" in res.stdout  # the error frame is among the last 5

    res = CliRunner().invoke(cli, ["status", "--config", cfg, "--timeout", "0.3", "--json"], env=ENV)
    assert res.exit_code == 1
    got = json.loads(res.stdout)
    assert got["agent"] is None and got["endpoint"] == ep and "no answer" in got["no_answer"]
    st = got["store"]
    assert (st["frames_ok"], st["frames_error"], st["pending"]) == (2, 1, 0)
    assert [f["frame_id"] for f in st["last_frames"]] == [r["frame_id"] for r in
                                                          sorted(real["rows"].values(), key=lambda r: r["processed_at"],
                                                                 reverse=True)]

    cfg2 = write_cfg(tmp_path, tmp_path / "nothing.sqlite", "null")
    res = CliRunner().invoke(cli, ["status", "--config", cfg2], env=ENV)
    assert res.exit_code == 1 and "query_endpoint is off" in res.stdout and "no results store" in res.stdout


def test_cli_status_asks_the_running_agent(tmp_path, cli):
    body = {"uptime_s": 3725.2, "frames_done": 41, "errors": 2, "queue_depth": 3,
            "last_frame_id": "c0ffee" * 10 + "abcd",
            "last_frame_at": "2024-05-01T10:00:00+00:00", "model": {"id": "pixel-64", "name": "pixel"},
            "reference_set": {"species": ["TCNE", "Br"]}, "sources": {"folder": {"seen": 44, "observer_alive": True}},
            "at": "2024-05-01T10:00:01+00:00"}
    with QueryServer("tcp://127.0.0.1:*", lambda c, a: body if c == "status" else None, agent_id="stm-lab2") as srv:
        cfg = write_cfg(tmp_path, tmp_path / "unused.sqlite", "null")
        res = CliRunner().invoke(cli, ["status", "--config", cfg, "--endpoint", srv.endpoint], env=ENV)
        assert res.exit_code == 0, res.output
        out = res.stdout
        for text in ("stm-lab2", "01:02:05", "41", "pixel-64", "TCNE, Br", "c0ffeec0ffee", "seen=44"):
            assert text in out, (text, out)
        res = CliRunner().invoke(cli, ["status", "--config", cfg, "--endpoint", srv.endpoint, "--json"], env=ENV)
        assert res.exit_code == 0 and json.loads(res.stdout)["agent"]["status"] == body
