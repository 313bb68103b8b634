"""Species discovery from the dashboard's API, on real scans: a physicist with no reference runs
discovery on the frames the agent has seen (Cu(111)/TCNE), sees the clusters with their medoid
crops, adopts one as a species (the code path of ``refs add --from-cluster``), and the agent's next
frame counts that species. Also: a folder inside the acquisition roots, one run at a time, a folder
outside the roots refused, and no run or adoption without the token."""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient

from stm_agent.adapters.dashboard.app import create_app
from stm_agent.adapters.references import ReferenceLibrary
from stm_agent.adapters.replay import make_unique_sxm
from tests.helpers import agent_session

SCANS = ["cu111_tcne_steps_clusters_50nm_256_down.sxm", "cu111_tcne_steps_50nm_256_up.sxm",
         "cu111_tcne_molecules_6nm_256_up.sxm", "bad/not_an_sxm.sxm"]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_finished(c: TestClient, timeout_s: float = 120.0) -> dict:
    """Poll the run's state until it is no longer running (the run is in another process)."""
    end = time.monotonic() + timeout_s
    while True:
        st = c.get("/api/discovery").json()
        if st["state"] != "running":
            return st
        assert time.monotonic() < end, f"discovery still running after {timeout_s} s: {st}"
        time.sleep(0.2)


def test_discover_on_seen_frames_adopt_and_the_next_frame_counts_it(sxm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("STM_AGENT_DASHBOARD_TOKEN", raising=False)
    cfg, _, msgs = agent_session(tmp_path, [sxm_dir / n for n in SCANS])
    assert [m["status"] for m in msgs] == ["ok", "ok", "ok", "error"]
    assert all(set(m["counts"]) == {"other"} for m in msgs[:3])  # no reference yet
    with TestClient(create_app(cfg, endpoint="", token=TOKEN)) as c:
        assert c.get("/api/discovery").json() == {"state": "idle"}
        assert c.post("/api/discovery", json={"source": "frames"}).status_code == 401
        r = c.post("/api/discovery", json={"source": "frames", "range": "all"}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "running" and r.json()["n_scans"] == 3  # the error frame is not re-read
        # one run at a time
        assert c.post("/api/discovery", json={"source": "frames"}, headers=AUTH).status_code == 409
        st = wait_finished(c)
        assert st["state"] == "done", st
        res = st["result"]
        assert res["n_scans"] == 3 and res["k"] == len(res["clusters"]) >= 2
        assert sum(cl["n"] for cl in res["clusters"]) == res["n_objects"] >= 10
        for cl in res["clusters"]:
            assert 1 <= len(cl["medoids"]) <= 5 and cl["area_nm2"] > 0
            png = c.get(cl["medoids"][0]["image"])
            assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
            assert c.get(cl["image"]).status_code == 200
        assert c.get(f"/api/discovery/runs/{res['run']}/../../results.sqlite").status_code == 404
        assert c.get(f"/api/discovery/runs/{res['run']}/objects.csv").status_code == 404

        # adopt the largest cluster: its 3 medoids become references, cut from their scans
        big = max(res["clusters"], key=lambda cl: cl["n"])
        body = {"run": res["run"], "cluster": big["cluster"], "species": "tcne_cluster"}
        assert c.post("/api/discovery/adopt", json=body).status_code == 401
        assert c.post("/api/discovery/adopt", json=body | {"species": "other"}, headers=AUTH).status_code == 422
        assert c.post("/api/discovery/adopt", json=body | {"cluster": 99}, headers=AUTH).status_code == 422
        r = c.post("/api/discovery/adopt", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        assert len(r.json()["ids"]) == min(3, big["n"])
        gallery = c.get("/api/references").json()["references"]
        assert {g["species"] for g in gallery} == {"tcne_cluster"} and len(gallery) == len(r.json()["ids"])
    entries = ReferenceLibrary(cfg.references.folder).entries()
    assert all(e.provenance["discovery"]["cluster"] == big["cluster"] for e in entries)
    medoid_scans = {m["scan"] for m in big["medoids"][:3]}
    assert {e.provenance["scan"].rsplit("/", 1)[-1] for e in entries} <= medoid_scans

    # the next frame (a new copy of the scan the medoids came from) counts the adopted species
    src = sxm_dir / sorted(medoid_scans)[0]
    again = tmp_path / f"again_{src.name}"
    again.write_bytes(make_unique_sxm(src.read_bytes(), 1))
    _, _, (nxt,) = agent_session(tmp_path, [again])
    assert nxt["status"] == "ok" and nxt["counts"].get("tcne_cluster", 0) >= 1, nxt["counts"]


def test_discover_on_a_folder_inside_the_acquisition_roots(sxm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("STM_AGENT_DASHBOARD_TOKEN", raising=False)
    cfg, _, _ = agent_session(tmp_path, [])
    day = tmp_path / "acq" / "2026-12-01"
    day.mkdir()
    for n in SCANS[:2]:
        shutil.copy(sxm_dir / n, day / n)
    with TestClient(create_app(cfg, endpoint="", token=TOKEN)) as c:
        folders = c.get("/api/discovery/folders").json()["folders"]
        assert {"folder": str(day), "scans": 2} in [{k: f[k] for k in ("folder", "scans")} for f in folders]
        # the agent has seen no frame: discovery on frames says so, in one line
        r = c.post("/api/discovery", json={"source": "frames"}, headers=AUTH)
        assert r.status_code == 422 and "no recorded frame" in r.json()["error"]
        r = c.post("/api/discovery", json={"source": "folder", "folder": str(sxm_dir)}, headers=AUTH)
        assert r.status_code == 422 and "outside the acquisition roots" in r.json()["error"]
        r = c.post("/api/discovery", json={"source": "folder", "folder": "2026-12-01/../../.."}, headers=AUTH)
        assert r.status_code == 422
        r = c.post("/api/discovery", json={"source": "folder", "folder": "2026-12-01"}, headers=AUTH)
        assert r.status_code == 202, r.text
        st = wait_finished(c)
        assert st["state"] == "done" and st["folder"].endswith("2026-12-01"), st
        assert st["result"]["n_scans"] == 2 and st["result"]["k"] >= 2
        # a run can be cancelled (the process starts in seconds: cancelled before it is done)
        assert c.post("/api/discovery/cancel", headers=AUTH).status_code == 409  # nothing running
        assert c.post("/api/discovery", json={"source": "folder", "folder": str(day)}, headers=AUTH).status_code == 202
        assert c.post("/api/discovery/cancel", headers=AUTH).status_code == 200
        st2 = wait_finished(c)
        assert st2["state"] == "cancelled" and not (cfg.results.store.parent / "discovery" / st2["run"]).exists(), st2
    # a dashboard opened later shows the newest finished run
    with TestClient(create_app(cfg, endpoint="", token=None)) as c:
        st3 = c.get("/api/discovery").json()
        assert st3["state"] == "done" and st3["run"] == st["run"] == st3["result"]["run"]
        assert c.post("/api/discovery", json={"source": "frames"}).status_code == 403
