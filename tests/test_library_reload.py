"""A running agent reloads its reference library when it changes (here: `stm-agent refs add` from
the CLI) and the next frame is counted with it; display images are kept for the dashboard."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from stm_agent.adapters.replay import make_unique_sxm
from stm_agent.adapters.zmq_io import Subscriber
from stm_agent.agent.cli import app
from stm_agent.agent.config import load_config
from stm_agent.agent.daemon import Agent
from stm_agent.adapters.outputs import display_dir

SCAN = "au111_adsorbates_10nm_256_up.sxm"  # 3 whole adsorbates
PARTIAL = "porphyrin_dimer_96_up_partial16pct.sxm"  # 84 % of the lines acquired


def test_refs_add_from_the_cli_is_used_by_the_next_frame(sxm_dir, tmp_path):
    refs = tmp_path / "refs"
    cfg = load_config(overrides={
        "references": {"folder": str(refs)},
        "acquisition": {"folder": str(tmp_path / "acq"), "settle_s": 0.3},
        "results": {"store": str(tmp_path / "results.sqlite")},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.2, "query_endpoint": None},
        "dashboard": {"keep_images": 2},
    })
    agent = Agent(cfg)
    sub = Subscriber(agent.endpoint, ["frame.counts", "agent.heartbeat"])
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()

    def next_frame(name: str) -> dict:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            got = sub.recv(timeout_ms=100)
            if got and got[0] == "frame.counts" and got[1]["name"] == name:
                return got[1]
        pytest.fail(f"no frame.counts for {name}")

    try:
        end = time.monotonic() + 10
        while (got := sub.recv(timeout_ms=100)) is None or got[0] != "agent.heartbeat":
            assert time.monotonic() < end
        data = (sxm_dir / SCAN).read_bytes()
        (tmp_path / "acq" / "a0.sxm").write_bytes(make_unique_sxm(data, 0))
        m0 = next_frame("a0.sxm")
        assert set(m0["counts"]) == {"other"} and m0["n_objects"] >= 1
        res = CliRunner().invoke(app, ["refs", "add", "adsorbate", "--scan", str(sxm_dir / SCAN), "--at", "91,82",
                                       "--px", "--refs", str(refs)])
        assert res.exit_code == 0, res.output
        assert "the object at" in res.output and "px)" in res.output  # says which object it took
        end = time.monotonic() + 20
        while agent.hooks.reloads < 1:
            assert time.monotonic() < end, "the agent did not reload its library"
            time.sleep(0.05)
        # identical content is processed once: the next frame is another copy of the scan
        (tmp_path / "acq" / "a1.sxm").write_bytes(make_unique_sxm(data, 1))
        m1 = next_frame("a1.sxm")
        assert set(m1["counts"]) == {"adsorbate", "other"}
        assert m1["counts"]["adsorbate"] >= 1  # the object it was picked from, at least
        # a partial scan: its display image marks the unacquired rows transparent
        (tmp_path / "acq" / PARTIAL).write_bytes((sxm_dir / PARTIAL).read_bytes())
        m2 = next_frame(PARTIAL)
    finally:
        agent.stop()
        th.join(20)
        sub.close()
    shown = sorted(p.name for p in display_dir(tmp_path / "results.sqlite").glob("*.png"))
    assert shown == sorted([f"{m1['frame_id']}.png", f"{m2['frame_id']}.png"])  # keep_images: 2
    img = cv2.imread(str(display_dir(tmp_path / "results.sqlite") / f"{m2['frame_id']}.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (96, 96, 4)
    acquired = (img[:, :, 3] == 255).all(axis=1)
    assert 0.8 < acquired.mean() < 0.9 and ((img[:, :, 3] == 0).all(axis=1) | acquired).all()
    assert np.ptp(img[acquired, :, 0]) > 100  # real contrast, not a flat grey
