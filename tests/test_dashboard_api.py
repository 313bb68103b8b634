"""The dashboard's API against a stopped agent's real store: history, frames with detections,
display images, trigger firings, the reference gallery, and access control (read-only without a
token; edits need the token)."""

from __future__ import annotations


import pytest
from fastapi.testclient import TestClient

from stm_agent.adapters.dashboard.app import create_app
from tests.helpers import agent_session

SCAN = "au111_adsorbates_10nm_256_up.sxm"
PARTIAL = "porphyrin_dimer_96_up_partial16pct.sxm"
BAD = "bad/not_an_sxm.sxm"


@pytest.fixture(scope="module")
def stopped_agent(sxm_dir, tmp_path_factory):
    """Config and frame.counts messages of an agent that processed 3 real files and stopped."""
    tmp = tmp_path_factory.mktemp("dash")
    cfg, _, msgs = agent_session(tmp, [sxm_dir / n for n in (SCAN, PARTIAL, BAD)],
                                 triggers=[{"name": "crowded", "metric": "count", "value": 1}])
    return cfg, msgs


def client(cfg, token=None) -> TestClient:
    return TestClient(create_app(cfg, endpoint="", token=token))


def test_history_frames_images_and_triggers(stopped_agent):
    cfg, msgs = stopped_agent
    with client(cfg) as c:
        info = c.get("/api/info").json()
        assert info["writable"] is False and info["channel"] == cfg.channel
        # no agent heartbeat: "session" falls back to every recorded frame
        frames = c.get("/api/frames").json()["frames"]
        assert [f["frame_id"] for f in frames] == [m["frame_id"] for m in msgs]
        ok, partial, bad = frames
        n = msgs[0]["n_objects"]
        assert ok["counts"] == msgs[0]["counts"] == {"other": n} and ok["area_nm2"] == pytest.approx(100.0, rel=1e-4)
        assert ok["density"]["other"] == pytest.approx(n / 100.0, rel=1e-4) and ok["latency_ms"] > 0
        assert partial["scan"]["completeness"] == pytest.approx(0.84, abs=0.01)
        assert bad["status"] == "error" and "not a Nanonis" in bad["reason"]
        d = c.get(f"/api/frames/{ok['frame_id']}").json()
        assert d["image"] and sum(not x["touches_edge"] for x in d["detections"]) == n
        assert d["channel"] == msgs[0]["scan"]["channel"]
        png = c.get(f"/api/frames/{ok['frame_id']}/image.png")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get(f"/api/frames/{bad['frame_id']}").json()["image"] is False
        assert c.get(f"/api/frames/{bad['frame_id']}/image.png").status_code == 404
        assert c.get("/api/frames/" + "0" * 64).status_code == 404
        assert c.get("/api/frames/../../etc/passwd/image.png").status_code == 404
        (firing,) = c.get("/api/triggers").json()["firings"]
        assert firing["rule"] == "crowded" and firing["frame_id"] == ok["frame_id"]
        assert c.get("/api/frames?range=1h").json()["since"] is not None
        page = c.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text and "cdn" not in page.text.lower()
        assert c.get("/static/app.js").status_code == 200


def test_read_only_without_token(stopped_agent):
    cfg, msgs = stopped_agent
    with client(cfg) as c:
        body = {"frame_id": msgs[0]["frame_id"], "x_px": 91, "y_px": 82, "species": "adsorbate"}
        r = c.post("/api/references", json=body, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "read-only" in r.json()["detail"]
        assert c.delete("/api/references/adsorbate/x").status_code == 403
        assert c.get("/api/references").json() == {"references": [], "writable": False}


def test_token_holder_adds_and_removes_a_reference(stopped_agent, monkeypatch):
    cfg, msgs = stopped_agent
    monkeypatch.delenv("STM_AGENT_DASHBOARD_TOKEN", raising=False)
    auth = {"Authorization": "Bearer s3cret"}
    with client(cfg, token="s3cret") as c:
        dets = c.get(f"/api/frames/{msgs[0]['frame_id']}").json()["detections"]
        x, y = next(d for d in dets if not d["touches_edge"])["centroid_px"]
        body = {"frame_id": msgs[0]["frame_id"][:12], "x_px": x, "y_px": y, "species": "adsorbate"}
        assert c.post("/api/references", json=body).status_code == 401
        assert c.post("/api/references", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/api/references", json=body, headers=auth)
        assert r.status_code == 200, r.text
        ref = r.json()
        assert ref["species"] == "adsorbate" and ref["scan"] == SCAN
        assert abs(ref["position_px"][0] - x) < 1 and abs(ref["position_px"][1] - y) < 1
        (g,) = c.get("/api/references").json()["references"]
        assert g["id"] == ref["id"] and g["scan"] == SCAN and len(g["position_nm"]) == 2
        # the same object again, under any name: 409 naming the reference it already is, nothing added
        for again in (body, body | {"species": "B"}):
            dup = c.post("/api/references", json=again, headers=auth)
            assert dup.status_code == 409 and f"already reference adsorbate/{ref['id']}" in dup.text, dup.text
        assert len(c.get("/api/references").json()["references"]) == 1
        crop = c.get(f"/api/references/adsorbate/{ref['id']}.png")
        assert crop.status_code == 200 and crop.content[:4] == b"\x89PNG"
        # no object there / bad name / frame that cannot be read again
        # the point of the frame farthest from every object (a 16 px grid)
        grid = [(gx, gy) for gx in range(8, 256, 16) for gy in range(8, 256, 16)]
        gx, gy = max(grid, key=lambda p: min((p[0] - d["centroid_px"][0]) ** 2 + (p[1] - d["centroid_px"][1]) ** 2
                                             for d in dets))
        far = body | {"x_px": gx, "y_px": gy}
        assert c.post("/api/references", json=far, headers=auth).status_code == 422
        assert c.post("/api/references", json=body | {"species": "other"}, headers=auth).status_code == 422
        assert c.post("/api/references", json=body | {"frame_id": msgs[2]["frame_id"]}, headers=auth).status_code == 422
        assert c.delete(f"/api/references/adsorbate/{ref['id']}", headers=auth).status_code == 200
        assert c.get("/api/references").json()["references"] == []
        assert not (cfg.references.folder / "adsorbate").exists()
        assert c.delete(f"/api/references/adsorbate/{ref['id']}", headers=auth).status_code == 404


def test_cli_dashboard_port_in_use_is_one_line(tmp_path):
    import socket

    from typer.testing import CliRunner

    from stm_agent.agent.cli import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = tmp_path / "a.yaml"
        cfg.write_text(f"results: {{store: {tmp_path / 'r.sqlite'}}}\npublish: {{endpoint: 'tcp://127.0.0.1:1'}}\n")
        res = CliRunner().invoke(app, ["dashboard", "--config", str(cfg), "--port", str(port)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"cannot serve on 127.0.0.1:{port}" in res.output
