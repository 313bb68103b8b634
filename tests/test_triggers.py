"""Triggers: declarative rules on real frames, hysteresis / cooldown / windows, the actions (a
command receiving the event, Nanonis TCP commands reaching the fake server only without dry_run),
every firing recorded in the store and published as ``trigger.fired``."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from stm_agent.adapters.actions import nanonis_action, run_command
from stm_agent.adapters.schemas import validate
from stm_agent.adapters.scanfile import read_scan
from stm_agent.adapters.store import ResultStore
from stm_agent.adapters.zmq_io import Subscriber
from stm_agent.agent.config import AgentConfig, load_config
from stm_agent.agent.daemon import Agent
from stm_agent.agent.errors import ConfigError
from stm_agent.agent.pipeline import Recognizer
from stm_agent.agent.triggers import CommandAction, NanonisAction, TriggerEngine, TriggerRule
from tests.fake_nanonis import FakeNanonis

# With an empty library every object is `other`. The sequence HIGH -> DIP -> MORE (counted objects
# a > b, then c >= 2a - b) is what hysteresis is for; the counts are measured, not assumed.
THREE = "cu111_tcne_molecules_6nm_256_up.sxm"      # HIGH
ONE = "cu111_tcne_molecules_4nm_256_up.sxm"        # DIP: fewer objects than HIGH
MANY = "graphene_tcne_monolayer_4nm_256_down.sxm"  # MORE (4 x 4 nm)
SEQUENCE = [THREE, ONE, MANY]
EMPTY = "moire_10nm_160_down.sxm"  # made empty: segmented at 1000 robust standard deviations
N: dict[str, int] = {}  # counted objects per scan, filled by the fixture


@pytest.fixture(scope="module")
def frames(sxm_dir, tmp_path_factory) -> dict[str, dict]:
    """Real frame results (empty library) of the scans used here, as the daemon feeds the engine."""
    cfg = AgentConfig(references={"folder": str(tmp_path_factory.mktemp("norefs"))})
    rec = Recognizer.from_config(cfg, allow_empty=True)
    out = {}
    blind = Recognizer.from_config(cfg.model_copy(update={"segment": cfg.segment.model_copy(
        update={"method": "value", "threshold": 1000.0})}), allow_empty=True)
    for name, r in [(n, rec) for n in (THREE, ONE, MANY)] + [(EMPTY, blind)]:
        r = r.recognise(read_scan(sxm_dir / name))
        out[name] = {"frame_id": r.frame_id, "name": name, "status": "ok", "counts": r.counts, "scan": r.scan}
        N[name] = r.n_objects
    a, b, c = N[THREE], N[ONE], N[MANY]
    assert 0 < b < a and c >= 2 * a - b, f"counts {a}, {b}, {c} no longer rise, dip, rise: pick other scans"
    assert N[EMPTY] == 0
    return out


def rule(**kw) -> TriggerRule:
    base = dict(name="r", metric="count", species=["other"], comparison=">=", value=N[THREE])
    return TriggerRule.model_validate(base | kw)


def fired(engine: TriggerEngine, frames: dict, names: list[str]) -> list[str]:
    return [f.event["name"] for n in names for f in engine.observe(frames[n])]


def test_hysteresis_fires_once_where_a_bare_threshold_fires_twice(frames):
    # a -> b -> c objects, rule "count >= a": with hysteresis a - b the dip to b is not below
    # a - (a - b), so the rule is not re-armed; without hysteresis it is, and fires again
    assert fired(TriggerEngine([rule(hysteresis=N[THREE] - N[ONE])]), frames, SEQUENCE) == [THREE]
    assert fired(TriggerEngine([rule(hysteresis=0)]), frames, SEQUENCE) == [THREE, MANY]
    # a condition that stays true fires once, not on every frame
    assert fired(TriggerEngine([rule()]), frames, [THREE, MANY, MANY, THREE]) == [THREE]


def test_cooldown_window_and_metrics(frames):
    t = [0.0]
    eng = TriggerEngine([rule(cooldown_s=60)], clock=lambda: t[0])
    assert fired(eng, frames, [THREE, ONE]) == [THREE]
    t[0] = 30.0
    assert fired(eng, frames, [MANY]) == []  # re-armed by the dip, but still cooling down
    t[0] = 61.0
    assert fired(eng, frames, [ONE, MANY]) == [MANY]

    # window: mean count over the last 2 frames; (a + b) / 2 < a, (b + c) / 2 >= a
    eng = TriggerEngine([rule(window=2)])
    assert fired(eng, frames, [THREE]) == []  # window not full yet
    assert fired(eng, frames, [ONE, MANY]) == [MANY]
    ev = TriggerEngine([rule(window=2)])
    ev.observe(frames[ONE])
    (f,) = ev.observe(frames[MANY])
    assert f.event["observed"] == pytest.approx((N[ONE] + N[MANY]) / 2)
    assert f.event["frames"] == [frames[ONE]["frame_id"], frames[MANY]["frame_id"]]

    # density: objects per nm^2 of acquired area (4 x 4 nm)
    eng = TriggerEngine([rule(metric="density", value=0.99 * N[MANY] / 16.0)])
    (f,) = eng.observe(frames[MANY])
    assert f.event["observed"] == pytest.approx(N[MANY] / (4.0 * 4.0), rel=1e-3)
    assert TriggerEngine([rule(metric="density", value=1.01 * N[MANY] / 16.0)]).observe(frames[MANY]) == []
    # no_objects: one empty frame in a window of 1; error frames are ignored
    eng = TriggerEngine([rule(metric="no_objects", species=None, value=1)])
    assert eng.observe({"frame_id": "x", "status": "error", "counts": {}}) == []
    assert fired(eng, frames, [THREE, EMPTY]) == [EMPTY]
    # other_fraction is undefined on an empty frame: no decision, no firing
    eng = TriggerEngine([rule(metric="other_fraction", species=None, value=0.5)])
    assert fired(eng, frames, [EMPTY, THREE]) == [THREE]


def test_fraction_between_species():
    eng = TriggerEngine([rule(metric="fraction", species=["after"], of=["before", "after"], value=0.5, window=2)])
    f = lambda i, b, a: {"frame_id": f"{i:064x}", "name": str(i), "counts": {"before": b, "after": a, "other": 9}}  # noqa: E731
    assert eng.observe(f(1, 10, 0)) == []
    assert eng.observe(f(2, 10, 2)) == []          # 2 / 22
    (got,) = eng.observe(f(3, 2, 12))               # (2 + 12) / (12 + 14) = 14 / 26
    assert got.event["observed"] == pytest.approx(14 / 26)
    assert eng.observe(f(4, 0, 0)) == []            # still true and disarmed


@pytest.mark.parametrize("bad, key", [
    ({"metric": "count", "value": 2, "comparison": "=>"}, "key comparison"),
    ({"metric": "fraction", "value": 0.5}, "needs `species`"),
    ({"metric": "other_fraction", "value": 1.5}, "within 0..1"),
    ({"metric": "count", "value": 1, "windw": 3}, "key windw: unknown key"),
    ({"metric": "count", "value": 1, "actions": [{"type": "nanonis", "action": "Util.RunScript"}]},
     "key actions.0.action"),
    ({"metric": "count", "value": 1, "actions": [{"type": "shell", "cmd": "rm -rf /"}]}, "key actions.0"),
    ({"metric": "count", "value": "__import__('os')"}, "key value"),
])
def test_bad_rule_is_refused_naming_the_rule_and_the_key(tmp_path, bad, key):
    p = tmp_path / "agent.yaml"
    p.write_text(json.dumps({"triggers": [{"name": "ok_rule", "metric": "count", "value": 1},
                                          {"name": "my_rule", **bad}]}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "triggers[1] (rule 'my_rule')" in msg and key in msg, msg


def test_duplicate_rule_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="two rules are named 'a'"):
        load_config(overrides={"triggers": [{"name": "a", "metric": "count", "value": 1}] * 2})


def test_cli_run_refuses_a_bad_rule_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from stm_agent.agent.cli import app

    p = tmp_path / "agent.yaml"
    p.write_text("triggers:\n  - {name: stop_on_dimer, metric: count, value: 1, cooldown_s: -5}\n")
    res = CliRunner().invoke(app, ["run", "--config", str(p)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "rule 'stop_on_dimer'" in res.output and "cooldown_s" in res.output


def test_command_action_gets_the_event_and_is_bounded(tmp_path):
    out = tmp_path / "event.json"
    ok = run_command(CommandAction(type="command", argv=[sys.executable, "-c",
                                                         f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"]),
                     {"rule": "r", "observed": 3})
    assert ok["exit_status"] == 0 and not ok["timed_out"] and json.loads(out.read_text()) == {"rule": "r", "observed": 3}
    slow = run_command(CommandAction(type="command", argv=[sys.executable, "-c", "import time; time.sleep(30)"],
                                     timeout_s=0.5), {})
    assert slow["timed_out"] and slow["exit_status"] is None and slow["duration_ms"] < 10_000
    missing = run_command(CommandAction(type="command", argv=["/nonexistent/notify"]), {})
    assert missing["exit_status"] is None and "cannot run" in missing["error"]
    failing = run_command(CommandAction(type="command", argv=[sys.executable, "-c", "import sys; sys.exit(3)"]), {})
    assert failing["exit_status"] == 3


def test_nanonis_action_reaches_the_fake_server_only_without_dry_run():
    with FakeNanonis() as fake:
        dry = nanonis_action(NanonisAction(type="nanonis", action="scan_stop"), "127.0.0.1", fake.port)
        assert dry["dry_run"] and not dry["sent"] and fake.actions == [] and fake.connections == 0
        real = nanonis_action(NanonisAction(type="nanonis", action="scan_pause", dry_run=False), "127.0.0.1", fake.port)
        assert real["sent"] and real["error_status"] == 0 and real["error"] is None
        assert fake.actions == [("Scan.Action", struct.pack(">HI", 2, 0))]
    gone = nanonis_action(NanonisAction(type="nanonis", action="scan_stop", dry_run=False), "127.0.0.1", fake.port)
    assert not gone["sent"] and "cannot send Scan.Action" in gone["error"]


def test_agent_fires_once_records_publishes_and_acts(frames, sxm_dir, tmp_path):
    """The real agent on real scans: a -> b -> c objects, rule `other >= a` with hysteresis a - b.

    Fires once, on the first frame: one trigger.fired (valid against its schema), one row in the
    store; the command receives the event on stdin; the Nanonis stop reaches the fake server on its
    own connection while the agent's Nanonis source sits in WaitEndOfScan on another; the dry-run
    pause does not; a slow command does not hold up the next frame."""
    out = tmp_path / "event.json"
    with FakeNanonis(max_wait_s=0.2) as fake:
        cfg = load_config(overrides={
            "agent_id": "stm-test",
            "references": {"folder": str(tmp_path / "refs")},
            "acquisition": {"folder": str(tmp_path / "acq"), "settle_s": 0.3},
            "nanonis": {"enabled": True, "port": fake.port, "wait_timeout_s": 0.2, "reconnect_s": 0.2},
            "results": {"store": str(tmp_path / "results.sqlite")},
            "publish": {"endpoint": "tcp://127.0.0.1:*", "heartbeat_s": 0.2, "query_endpoint": None},
            "triggers": [{
                "name": "many_objects", "metric": "count", "species": "other", "comparison": ">=",
                "value": N[THREE], "hysteresis": N[THREE] - N[ONE],
                "actions": [
                    {"type": "publish"},
                    {"type": "command", "timeout_s": 4, "argv": [
                        sys.executable, "-c",
                        f"import sys, time; open({str(out)!r}, 'w').write(sys.stdin.read()); time.sleep(10)"]},
                    {"type": "nanonis", "action": "scan_stop", "dry_run": False},
                    {"type": "nanonis", "action": "scan_pause"},
                ]}],
        })
        agent = Agent(cfg)
        sub = Subscriber(agent.endpoint)
        th = threading.Thread(target=agent.run, daemon=True)
        th.start()
        log: list[tuple[str, dict]] = []

        def wait_for(topic: str, timeout: float = 20.0, where=lambda m: True) -> dict:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                got = sub.recv(timeout_ms=100)
                if got:
                    log.append(got)
                    if got[0] == topic and where(got[1]):
                        return got[1]
            pytest.fail(f"no {topic} within {timeout} s")

        try:
            wait_for("agent.heartbeat")
            done = []
            for name in SEQUENCE:
                shutil.copy(sxm_dir / name, tmp_path / "acq" / name)
                done.append(wait_for("frame.counts", where=lambda m, n=name: m["name"] == n))
            time.sleep(0.5)
            while (got := sub.recv(timeout_ms=100)):
                log.append(got)
            fired_msgs = [m for t, m in log if t == "trigger.fired"]
            assert [d["counts"]["other"] for d in done] == [N[THREE], N[ONE], N[MANY]]
            assert len(fired_msgs) == 1, fired_msgs
            ev = fired_msgs[0]
            validate("trigger.fired", ev)
            first = hashlib.sha256((sxm_dir / THREE).read_bytes()).hexdigest()
            assert ev["rule"] == "many_objects" and ev["frame_id"] == first and ev["observed"] == N[THREE]
            assert ev["name"] == THREE and ev["firing"] == 1
            # the worker did not wait for the command (killed after 4 s): the next frame went through
            t0, t1 = (datetime.fromisoformat(d["processed_at"]) for d in done[:2])
            assert (t1 - t0).total_seconds() < 3.5
            end = time.monotonic() + 15
            while time.monotonic() < end:
                rows = agent.store.firings()
                if rows and all(r is not None for r in rows[0]["results"][1:]):
                    break
                time.sleep(0.1)
            (row,) = agent.store.firings()
            assert row["rule"] == "many_objects" and row["frame_id"] == first
            res = row["results"]
            assert res[0] is None  # publish: no separate result
            assert res[1]["type"] == "command" and res[1]["timed_out"] and res[1]["exit_status"] is None
            # the command got the event as published (without the envelope keys) on stdin
            received = json.loads(out.read_text())
            assert received == {k: v for k, v in ev.items() if k not in ("schema", "agent_id", "seq")}
            assert res[2]["sent"] and res[2]["error_status"] == 0 and res[2]["dry_run"] is False
            assert res[3]["dry_run"] and not res[3]["sent"]
            assert [a[0] for a in fake.actions] == ["Scan.Action"]
            assert fake.actions[0][1] == struct.pack(">HI", 1, 0)  # stop, not pause
            # meanwhile the Nanonis source kept waiting on its own connection
            assert any(c == "Scan.WaitEndOfScan" for c, _ in fake.requests) and fake.connections >= 2
        finally:
            agent.stop()
            th.join(20)
            sub.close()
    assert not th.is_alive()
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert len(store.firings()) == 1 and store.count() == 3
