"""The dashboard in a real headless browser (Debian's Chromium driven by Playwright for Python).

The real agent runs with real scans and its dashboard; the page shows the frame with its overlay,
the counts and the time series, updates live as scans arrive, and turns a clicked object into a
reference that the agent uses for the next frame. A second browser opened late gets the history
and, without the token, cannot edit. Discovery runs from the page on the recorded frames while the
live view goes on; a discovered cluster adopted in one click is counted in the next frame. Screenshots go to ``tmp_path/screenshots`` (or to
``$STM_AGENT_SCREENSHOTS``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from stm_agent.adapters.replay import make_unique_sxm
from stm_agent.adapters.zmq_io import Subscriber
from stm_agent.agent.config import load_config
from stm_agent.agent.daemon import Agent

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
SCAN = "au111_adsorbates_10nm_256_up.sxm"  # adsorbates on Au(111), several cut by the edge
SECOND = "cu111_tcne_molecules_6nm_256_up.sxm"
PARTIAL = "porphyrin_dimer_96_up_partial16pct.sxm"  # 84 % of the lines acquired
TOKEN = "lab-token-1"


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium); "
                    ".ci/run does it", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_dashboard_live_frame_series_and_one_click_reference(browser, sxm_dir, tmp_path):
    shots = Path(os.environ.get("STM_AGENT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides={
        "agent_id": "stm-lab-1",
        "references": {"folder": str(tmp_path / "refs")},
        "acquisition": {"folder": str(tmp_path / "acq"), "settle_s": 0.3},
        "results": {"store": str(tmp_path / "results.sqlite")},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.5, "query_endpoint": None},
        "dashboard": {"enabled": True, "port": 0, "token": TOKEN},
        "triggers": [{"name": "many_objects", "metric": "count", "species": "other", "value": 1,
                      "actions": [{"type": "publish"}, {"type": "nanonis", "action": "scan_pause"}]}],
    })
    agent = Agent(cfg)
    sub = Subscriber(agent.endpoint, ["frame.counts"])
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    data = (sxm_dir / SCAN).read_bytes()
    acq = tmp_path / "acq"

    def arrive(name: str, content: bytes) -> dict:
        (acq / name).write_bytes(content)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            got = sub.recv(timeout_ms=100)
            if got and got[1]["name"] == name:
                return got[1]
        pytest.fail(f"the agent published no frame.counts for {name}")

    try:
        end = time.monotonic() + 20
        while agent.hooks.dashboard is None or not acq.is_dir():
            assert th.is_alive() and time.monotonic() < end, "the agent did not start its dashboard"
            time.sleep(0.05)
        url = agent.hooks.dashboard.url
        first = arrive("a0.sxm", make_unique_sxm(data, 0))  # before the page opens: history

        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + f"#token={TOKEN}")
        page.wait_for_function("window.stmDash.ready", timeout=20_000)
        # the frame from history: image, overlay boxes (counted + cut by the edge), counts, meta
        page.wait_for_function("document.getElementById('frame-img').naturalWidth === 256")
        dets = agent.store.get(first["frame_id"])["detections"]
        n_edge = sum(d["touches_edge"] for d in dets)
        assert first["n_objects"] >= 1 and n_edge >= 1
        assert page.locator("#overlay rect.obj").count() == first["n_objects"]
        assert page.locator("#overlay rect.edge").count() == n_edge
        assert page.locator("#frame-counts [data-species=other] b").inner_text() == str(first["counts"]["other"])
        meta = page.inner_text("#frame-meta")
        for bit in ("a0.sxm", f"{first['scan']['channel']} forward", "10.0 × 10.0 nm", "256 × 256 px", "bias 2 V",
                    "100 % acquired"):
            assert bit in meta, meta
        assert page.locator("#series polyline[data-species=other]").count() == 1
        health = page.inner_text("#health-text")
        assert "heartbeat" in health and "sources folder up" in health, health
        assert page.locator("#triggers li[data-rule=many_objects]").count() == 1

        # live: a second scan and a partial one appear without reloading
        second = arrive(SECOND, (sxm_dir / SECOND).read_bytes())
        page.wait_for_function(f"window.stmDash.rendered.some(r => r.frame_id === '{second['frame_id']}')",
                               timeout=10_000)
        assert SECOND in page.inner_text("#frame-meta")
        partial = arrive(PARTIAL, (sxm_dir / PARTIAL).read_bytes())
        page.wait_for_function(f"window.stmDash.rendered.some(r => r.frame_id === '{partial['frame_id']}')",
                               timeout=10_000)
        assert "84 % acquired" in page.inner_text("#frame-meta")
        # unacquired rows are transparent in the display image (the page's hatching shows through)
        alpha = page.evaluate("""() => { const i = document.getElementById('frame-img');
            const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(i, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data; let clear = 0;
            for (let k = 3; k < d.length; k += 4) if (d[k] === 0) clear++; return clear / (c.width * c.height); }""")
        assert 0.1 < alpha < 0.2, alpha
        page.screenshot(path=str(shots / "dashboard_partial.png"), full_page=True)
        assert page.locator("#frames tbody tr").count() == 3
        pts = page.get_attribute("#series polyline[data-species=other]", "points").split()
        assert len(pts) == 3

        # hover: species, score, size, position
        page.locator("#frames tbody tr", has_text="a0.sxm").click()
        page.wait_for_function("document.getElementById('frame-meta').innerText.includes('a0.sxm')")
        box = page.locator("#overlay rect.obj").first
        box.hover()
        tip = page.inner_text("#tooltip")
        assert "other" in tip and "nm²" in tip and "position" in tip and " nm" in tip

        # click an object, name it: it becomes a reference, shown in the gallery
        box.click()
        page.fill("#pick-species", "adsorbate")
        page.click("#pick-add")
        page.wait_for_function("document.getElementById('pick-msg').innerText.includes('added adsorbate')",
                               timeout=15_000)
        page.wait_for_selector("#refs .card[data-species=adsorbate]", timeout=10_000)
        assert page.locator("#refs .card[data-species=adsorbate]").count() == 1
        end = time.monotonic() + 20
        while agent.hooks.reloads < 1:
            assert time.monotonic() < end, "the agent did not reload its reference library"
            time.sleep(0.05)

        # the next frame (another copy of the scan: identical content is processed once) counts it
        page.check("#follow")
        third = arrive("a1.sxm", make_unique_sxm(data, 1))
        n_ads = third["counts"].get("adsorbate", 0)
        assert n_ads >= 1, third["counts"]  # at least the object it was picked from
        page.wait_for_function(f"window.stmDash.rendered.some(r => r.frame_id === '{third['frame_id']}')",
                               timeout=10_000)
        assert page.locator("#frame-counts [data-species=adsorbate] b").inner_text() == str(n_ads)
        assert page.locator("#series polyline[data-species=adsorbate]").count() == 1
        assert page.locator("#overlay rect.obj[data-species=adsorbate]").count() == n_ads
        page.select_option("#metric", "density")
        assert page.locator("#series polyline[data-species=adsorbate]").count() == 1
        page.select_option("#metric", "count")
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
        assert not errors, errors

        # a second browser, opened late and without the token: history, view only
        other = browser.new_page(viewport={"width": 1200, "height": 900})
        other.goto(url)
        other.wait_for_function("window.stmDash.ready", timeout=20_000)
        assert other.locator("#frames tbody tr").count() == 4
        assert "a1.sxm" in other.inner_text("#frame-meta")
        other.locator("#overlay rect.obj").first.click()
        assert other.is_disabled("#pick-add") and "read-only" in other.inner_text("#pick-msg")
        assert other.locator("#refs .card button").count() == 0
        r = httpx.post(url + "api/references", json={"frame_id": first["frame_id"], "x_px": 91, "y_px": 82,
                                                      "species": "intruder"})
        assert r.status_code == 401
        # both pages receive the next frame
        fourth = arrive("a2.sxm", make_unique_sxm(data, 2))
        for p in (page, other):
            p.wait_for_function(f"window.stmDash.rendered.some(r => r.frame_id === '{fourth['frame_id']}')",
                                timeout=10_000)
        other.screenshot(path=str(shots / "dashboard_readonly.png"), full_page=True)
        assert other.is_disabled("#disc-run")

        # discovery from the page: run it on the recorded frames, see the clusters, adopt one
        page.select_option("#disc-source", "frames:all")
        page.click("#disc-run")
        # the live view goes on while it runs: a frame that arrives now is shown
        fifth = arrive("a3.sxm", make_unique_sxm(data, 3))
        page.wait_for_function(f"window.stmDash.rendered.some(r => r.frame_id === '{fifth['frame_id']}')",
                               timeout=10_000)
        page.wait_for_selector("#disc-clusters .dcluster", timeout=120_000)
        page.wait_for_function("document.getElementById('disc-status').innerText.includes('clusters')")
        st = httpx.get(url + "api/discovery").json()
        assert st["state"] == "done", st
        res = st["result"]
        seen = page.evaluate("window.stmDash.discovery")
        assert "segmenting" in seen and seen[-1] == "done", seen
        assert f"{res['n_objects']} objects in {res['n_scans']} scans" in page.inner_text("#disc-status")
        assert page.locator("#disc-clusters .dcluster").count() == res["k"] >= 2
        page.wait_for_function("[...document.querySelectorAll('#disc-clusters img')].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#disc-clusters img").count() == sum(min(5, len(c["medoids"])) for c in res["clusters"])
        # the other page got the same clusters through the live feed, and cannot adopt
        other.wait_for_selector("#disc-clusters .dcluster", timeout=10_000)
        assert other.locator("#disc-clusters button.adopt:disabled").count() == res["k"]
        big = max(res["clusters"], key=lambda c: c["n"])
        card = page.locator(f"#disc-clusters .dcluster[data-cluster='{big['cluster']}']")
        assert f"{big['n']} objects" in card.inner_text()
        card.locator("input").fill("discovered")
        card.locator("button.adopt").click()
        page.wait_for_function(f"""document.querySelector("#disc-clusters .dcluster[data-cluster='{big['cluster']}'] .dmsg")
                               .innerText.includes('adopted as discovered')""", timeout=30_000)
        n_ref = int(card.locator(".dmsg").inner_text().split(": ")[1].split()[0])  # "adopted as x: 3 references"
        assert 1 <= n_ref <= 3 and page.locator("#refs .card[data-species=discovered]").count() == n_ref
        end = time.monotonic() + 20
        while agent.hooks.reloads < 2:
            assert time.monotonic() < end, "the agent did not reload its reference library"
            time.sleep(0.05)
        page.locator("#disc-panel").screenshot(path=str(shots / "dashboard_discovery_panel.png"))
        page.screenshot(path=str(shots / "dashboard_discovery.png"), full_page=True)
        # the next frame, a copy of the scan the first medoid came from, counts the adopted species
        src = big["medoids"][0]["scan"]
        nxt = arrive("d0.sxm", make_unique_sxm((acq / src).read_bytes(), 10))
        assert nxt["counts"].get("discovered", 0) >= 1, nxt["counts"]
        page.wait_for_function(f"window.stmDash.rendered.some(r => r.frame_id === '{nxt['frame_id']}')",
                               timeout=10_000)
        assert page.locator("#frame-counts [data-species=discovered] b").inner_text() == str(nxt["counts"]["discovered"])
        assert not errors, errors
    finally:
        agent.stop()
        th.join(20)
        sub.close()
    assert not th.is_alive()
    for name in ("dashboard.png", "dashboard_partial.png", "dashboard_readonly.png", "dashboard_discovery.png"):
        assert (shots / name).stat().st_size > 20_000
    assert set(first["counts"]) == {"other"} and second["status"] == "ok"
