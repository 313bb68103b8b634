"""JSON Schemas of the published messages: messages of the real agent on real scans validate
(jsonschema), hand-made invalid messages are rejected naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from stm_agent.adapters.scanfile import read_scan
from stm_agent.adapters.schemas import SCHEMA_DIR, TOPICS, MessageSchemaError, schema_for, validate

from tests.helpers import BAD, REF_SCAN, SMALL, run_real_agent, sha  # noqa: E402,F401


@pytest.fixture(scope="module")
def real_run(sxm_dir, tmp_path_factory) -> dict:
    return run_real_agent(tmp_path_factory.mktemp("schemas"), sxm_dir, [REF_SCAN, SMALL, BAD])


# ---------------------------------------------------------------------- the files themselves
def test_schema_files_are_valid_draft_2020_12():
    from jsonschema import Draft202012Validator

    names = sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
    assert names == sorted(f"{t}.schema.json" for t in TOPICS)
    for t in TOPICS:
        s = schema_for(t)
        Draft202012Validator.check_schema(s)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert s["$id"].endswith(f"/{t}.schema.json")
    s = schema_for("frame.counts")
    s["title"] = "changed"
    assert schema_for("frame.counts")["title"] == "frame.counts"  # a copy
    with pytest.raises(KeyError, match="frame.nope"):
        schema_for("frame.nope")


# ---------------------------------------------------------------------- real messages
def test_real_agent_messages_validate(real_run, sxm_dir):
    """Every message the real agent published on real scans (ok frames, an unreadable file,
    heartbeats, start/stop) follows its schema."""
    log = real_run["log"]
    by_topic: dict[str, list[dict]] = {}
    for topic, msg in log:
        by_topic.setdefault(topic, []).append(msg)
    assert set(by_topic) == {"frame.counts", "frame.detections", "agent.status", "agent.heartbeat"}
    counts = {m["frame_id"]: m for m in by_topic["frame.counts"]}
    assert counts[sha(sxm_dir / REF_SCAN)]["status"] == "ok"
    assert counts[sha(sxm_dir / BAD)]["status"] == "error"
    assert [m["state"] for m in by_topic["agent.status"]][-1] == "stopping"
    problems = []
    for topic, msg in log:
        try:
            validate(topic, msg)
        except MessageSchemaError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(sorted(set(problems)))
    seqs = [m["seq"] for _, m in log]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # increasing per agent


# ---------------------------------------------------------------------- hand-made messages
@pytest.fixture(scope="module")
def valid(sxm_dir) -> dict[str, dict]:
    """One valid message per topic, with the scan fields of a real scan."""
    scan = read_scan(sxm_dir / REF_SCAN)
    summ = scan.summary()
    scan_obj = {k: summ[k] for k in ("pixels", "range_nm", "pixel_size_nm", "bias_V", "setpoint_A",
                                     "angle_deg")} | {"direction": summ["direction"]}
    head = {"schema": 1, "agent_id": "stm-test", "seq": 7}
    frame = {"frame_id": scan.frame_id, "source": "folder", "path": str(sxm_dir / REF_SCAN), "name": REF_SCAN,
             "acquired_at": summ["acquired_at"], "received_at": "2024-05-01T10:00:00.5+00:00",
             "processed_at": "2024-05-01T10:00:01.25+00:00", "scan": scan_obj, "status": "ok",
             "redelivered": False}
    det = {"bbox_px": [10, 12, 8, 9], "centroid_px": [14.2, 16.0], "centroid_nm": [1.25, -3.5], "area_nm2": 0.75,
           "touches_edge": False, "species": "adsorbate", "similarity": 0.93,
           "pose": {"angle_deg": 40.0, "mirrored": True}, "scores": {"adsorbate": 0.93}}
    return {
        "frame.counts": head | frame | {
            "counts": {"adsorbate": 3, "other": 0}, "n_objects": 3, "encoder": {"name": "pixel", "id": "pixel-64"},
            "timings_ms": {"read": 3.5, "total": 120.0}, "latency_ms": 2200.0, "reason": None, "files": [],
            "catch_up": False, "config_digest": "0123456789abcdef", "frame_seq": 3},
        "frame.detections": head | frame | {"detections": [det]},
        "agent.status": head | {"state": "started", "config_digest": "0123456789abcdef",
                                "at": "2024-05-01T10:00:00+00:00", "pid": 4242, "endpoint": "tcp://127.0.0.1:5556",
                                "query_endpoint": None, "sources": ["folder"], "encoder": "pixel-64",
                                "species": ["adsorbate"]},
        "agent.heartbeat": head | {"uptime_s": 12.5, "frames_done": 3, "errors": 1, "queue_depth": 0,
                                   "last_frame_id": scan.frame_id, "last_frame_at": "2024-05-01T10:00:01+00:00",
                                   "model": {"id": "pixel-64", "name": "pixel"},
                                   "reference_set": {"species": ["adsorbate"], "cache_key": "ab12"},
                                   "sources": {"folder": {"seen": 4, "observer_alive": True}},
                                   "at": "2024-05-01T10:00:02+00:00"},
    }


def _set(msg: dict, path: str, value) -> dict:
    out = copy.deepcopy(msg)
    *parents, last = path.split(".")
    d = out
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if value is _DROP:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return out


_DROP = object()

INVALID = [
    # (topic, key to change, new value, key the error must name)
    ("frame.counts", "counts.adsorbate", -1, "counts.adsorbate"),  # negative count
    ("frame.counts", "counts.adsorbate", 2.5, "counts.adsorbate"),  # not an integer
    ("frame.counts", "n_objects", "3", "n_objects"),  # wrong type
    ("frame.counts", "received_at", _DROP, "received_at"),  # missing key
    ("frame.counts", "redelivered", _DROP, "redelivered"),
    ("frame.counts", "seq", 0, "seq"),
    ("frame.counts", "schema", 2, "schema"),
    ("frame.counts", "frame_id", "ABC" * 21 + "d", "frame_id"),  # not lower-case sha256 hex
    ("frame.counts", "status", "done", "status"),
    ("frame.counts", "status", "error", "reason"),  # error with reason null
    ("frame.counts", "scan.pixels", [256], "scan.pixels"),
    ("frame.counts", "scan.bias_V", "2 V", "scan.bias_V"),
    ("frame.counts", "scan.zoom", 2, "scan.zoom"),  # strict object: unknown key
    ("frame.counts", "processed_at", "yesterday", "processed_at"),
    ("frame.counts", "latency_ms", -5, "latency_ms"),
    ("frame.detections", "detections.0.bbox_px", [1, 2, 3], "detections[0].bbox_px"),
    ("frame.detections", "detections.0.touches_edge", "no", "detections[0].touches_edge"),
    ("frame.detections", "detections.0.pose.mirrored", _DROP, "detections[0].pose.mirrored"),
    ("frame.detections", "name", _DROP, "name"),
    ("agent.status", "state", "paused", "state"),
    ("agent.status", "pid", _DROP, "pid"),  # started needs pid
    ("agent.status", "watch_dir", "/data", "watch_dir"),  # unknown key
    ("agent.heartbeat", "queue_depth", -1, "queue_depth"),
    ("agent.heartbeat", "frames_done", True, "frames_done"),
    ("agent.heartbeat", "last_frame_id", "abc", "last_frame_id"),
    ("agent.heartbeat", "sources.folder", 3, "sources.folder"),
    ("agent.heartbeat", "at", _DROP, "at"),
]


def test_valid_hand_made_messages_pass(valid):
    for topic, msg in valid.items():
        validate(topic, msg)
    err = _set(valid["frame.counts"], "status", "error")
    validate("frame.counts", _set(err, "reason", "not a Nanonis .sxm scan") | {"scan": None, "counts": {}})
    stop = {k: v for k, v in valid["agent.status"].items() if k not in ("pid", "endpoint", "query_endpoint",
                                                                        "sources", "encoder", "species")}
    validate("agent.status", stop | {"state": "stopping", "frames_done": 3, "errors": 0})


@pytest.mark.parametrize("topic,path,value,key", INVALID, ids=[f"{t}:{p}" for t, p, _, _ in INVALID])
def test_invalid_messages_are_rejected_naming_the_key(valid, topic, path, value, key):
    bad = _set(valid[topic], path, value)
    with pytest.raises(MessageSchemaError) as info:
        validate(topic, bad)
    assert info.value.topic == topic and info.value.key == key, str(info.value)
    assert topic in str(info.value) and repr(key) in str(info.value)


def test_query_reply_schema(valid):
    frame = {k: v for k, v in valid["frame.counts"].items() if k != "seq"}
    state = {k: v for k, v in valid["agent.heartbeat"].items() if k not in ("schema", "agent_id", "seq")}
    env = {"schema": 1, "agent_id": "stm-test"}
    validate("query.reply", env | {"request": "latest", "frame": frame})
    validate("query.reply", env | {"request": "status", "status": state | {"config_digest": "ab"}})
    validate("query.reply", env | {"request": None, "error": "unknown request 'x'"})
    validate("query.reply", env | {"request": "since", "frames": [frame, frame | {"frame_seq": 4}], "more": False,
                                   "last_frame_seq": 4})
    for bad in (env | {"request": "since", "frames": [frame | {"frame_seq": 0}], "more": False, "last_frame_seq": 4},
                env | {"request": "since", "frames": [{k: v for k, v in frame.items() if k != "frame_seq"}],
                       "more": False, "last_frame_seq": 4},
                env | {"request": "since", "frames": [], "last_frame_seq": 4},env | {"request": "latest", "frame": frame, "error": "both"},
                env | {"request": "latest", "frame": frame | {"counts": {"adsorbate": -2}}},
                env | {"request": "status", "status": state | {"queue_depth": "0"}},
                {"agent_id": "stm-test", "request": None, "error": "no schema"}):
        with pytest.raises(MessageSchemaError, match="query.reply"):
            validate("query.reply", bad)


def _doc_sections(doc: str) -> dict[str, str]:
    """docs/messages.md split at its ``##``/``###`` headings: {heading text: section body}."""
    out, head = {}, ""
    for line in doc.splitlines():
        if line.startswith("## ") or line.startswith("### "):
            head = line.lstrip("#").strip()
            out[head] = ""
        else:
            out[head] = out.get(head, "") + line + "\n"
    return out


def test_schemas_match_the_docs():
    """docs/messages.md documents every field of every topic in that topic's own section (or, for
    the fields every message has, in "Header of every message"), and documents no field of a
    topic that its schema does not have."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "messages.md").read_text(encoding="utf-8")
    sections = _doc_sections(doc)
    header = sections["Header of every message"]
    for t in ("frame.counts", "frame.detections", "agent.status", "agent.heartbeat", "trigger.fired"):
        s = schema_for(t)
        props = s.get("properties") or s["$defs"][next(iter(s["$defs"]))]["properties"]
        own = next(body for head, body in sections.items() if head.startswith(f"`{t}`"))
        missing = [k for k in props if f"`{k}`" not in own and f"`{k}`" not in header]
        assert not missing, f"{t}: fields not documented in its section of docs/messages.md: {missing}"
        if t == "frame.counts":  # the table rows of the section are exactly fields of the schema
            rows = [ln.split("|")[1].strip().strip("`") for ln in own.splitlines()
                    if ln.startswith("| `")]
            assert rows and not [r for r in rows if r not in props], f"{t}: documented but not in the schema"
    assert json.loads((SCHEMA_DIR / "query.reply.schema.json").read_text())["title"] == "query.reply"
