"""Bluesky: the real agent on real scans emits start / descriptor / event per frame / stop, each
valid against event-model's JSON schemas, with the counts it published."""

from __future__ import annotations

import json

import pytest
from event_model import DocumentNames, schema_validators

from stm_agent.adapters.bluesky import BlueskyRecorder, data_key
from tests.helpers import agent_session

SCANS = ["cu111_tcne_molecules_6nm_256_up.sxm", "graphene_tcne_monolayer_4nm_256_down.sxm"]
BROKEN = "bad"  # folder of broken files: their frames are errors, not events


def validate_doc(name: str, doc: dict) -> None:
    schema_validators[DocumentNames[name]].validate(doc)


def test_agent_session_as_valid_event_model_documents(sxm_dir, tmp_path):
    bad = sorted((sxm_dir / BROKEN).glob("*.sxm"))[0]
    cfg, agent, published = agent_session(
        tmp_path, [sxm_dir / SCANS[0], bad, sxm_dir / SCANS[1]],
        bluesky={"enabled": True, "folder": str(tmp_path / "bluesky")})
    assert [m["status"] for m in published] == ["ok", "error", "ok"]
    (path,) = (tmp_path / "bluesky").glob("*.jsonl")
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [n for n, _ in docs] == ["start", "descriptor", "event", "event", "stop"]
    for name, doc in docs:
        validate_doc(name, doc)
    start, desc, stop = docs[0][1], docs[1][1], docs[-1][1]
    assert path.stem == start["uid"] and start["plan_name"] == "stm-agent"
    assert start["config_digest"] == agent.config_digest
    assert desc["run_start"] == start["uid"] and desc["name"] == "primary"
    assert stop["run_start"] == start["uid"] and stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 2}
    ok = [m for m in published if m["status"] == "ok"]
    for (_, ev), msg in zip(docs[2:4], ok):
        assert ev["descriptor"] == desc["uid"]
        assert ev["data"]["frame_id"] == msg["frame_id"] and ev["data"]["n_objects"] == msg["n_objects"]
        assert ev["data"][data_key("other")] == msg["counts"]["other"]
    # objects on 4 x 4 nm
    assert docs[3][1]["data"]["density_nm2"] == pytest.approx(ok[1]["n_objects"] / 16, rel=1e-3)


def test_species_change_starts_a_new_stream_and_names_are_safe():
    docs = []
    rec = BlueskyRecorder(lambda n, d: docs.append((n, d)), agent_id="a")
    base = {"status": "ok", "frame_id": "0" * 64, "name": "f", "scan": {"range_nm": [10, 10]}}
    rec.frame(base | {"counts": {"other": 2}})
    rec.frame(base | {"counts": {"Br.TPP": 1, "other": 0}})
    rec.frame(base | {"status": "error", "counts": {}})
    rec.frame(base | {"counts": {"other": 5}})
    rec.close()
    rec.close()
    assert [n for n, _ in docs] == ["start", "descriptor", "event", "descriptor", "event", "event", "stop"]
    for n, d in docs:
        validate_doc(n, d)
    assert docs[3][1]["name"] == "primary_2" and "count_Br_TPP" in docs[3][1]["data_keys"]
    assert docs[4][1]["data"]["count_Br_TPP"] == 1 and docs[4][1]["descriptor"] == docs[3][1]["uid"]
    assert docs[5][1]["descriptor"] == docs[1][1]["uid"]  # back to the first species set
    assert docs[-1][1]["num_events"] == {"primary": 2, "primary_2": 1}
