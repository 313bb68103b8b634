"""Prometheus metrics served on a real HTTP port, read back with urllib and parsed."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

import pytest

from stm_agent.adapters.prometheus import LATENCY_BUCKETS_S, AgentMetrics, NullMetrics, build_metrics
from stm_agent.agent.config import MetricsConfig


def scrape(port: int) -> dict[str, float]:
    """GET /metrics and parse the text format into {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode("utf-8")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_served_and_counted():
    m = AgentMetrics(host="127.0.0.1", port=0).start()
    try:
        assert m.enabled and isinstance(m.port, int) and m.port > 0
        first = scrape(m.port)
        assert first['stm_agent_frames_processed_total{status="ok"}'] == 0  # present before the first frame
        assert first["stm_agent_frame_latency_seconds_count"] == 0
        for latency in (0.004, 0.3, 2.0, 75.0):
            m.frame_done("ok", latency)
        m.frame_done("error", 1.2)
        m.frame_done("error")  # latency unknown: counted, not observed
        m.set_queue_depth(7)
        got = scrape(m.port)
        assert got['stm_agent_frames_processed_total{status="ok"}'] == 4
        assert got['stm_agent_frames_processed_total{status="error"}'] == 2
        assert got["stm_agent_frame_errors_total"] == 2
        assert got["stm_agent_queue_depth"] == 7
        assert got["stm_agent_frame_latency_seconds_count"] == 5
        assert got["stm_agent_frame_latency_seconds_sum"] == pytest.approx(0.004 + 0.3 + 2.0 + 75.0 + 1.2)
        assert got['stm_agent_frame_latency_seconds_bucket{le="0.01"}'] == 1
        assert got['stm_agent_frame_latency_seconds_bucket{le="2.5"}'] == 4
        assert got['stm_agent_frame_latency_seconds_bucket{le="60.0"}'] == 4
        assert got['stm_agent_frame_latency_seconds_bucket{le="+Inf"}'] == 5
        assert LATENCY_BUCKETS_S[0] == 0.01 and LATENCY_BUCKETS_S[-1] == 60.0
    finally:
        port = m.port
        t0 = time.monotonic()
        m.stop()
        assert time.monotonic() - t0 < 2.0
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # stopped: the port is closed
    m.stop()  # idempotent


def test_two_agents_have_separate_registries():
    a, b = AgentMetrics(port=0).start(), AgentMetrics(port=0).start()
    try:
        assert a.port != b.port and a.registry is not b.registry
        a.frame_done("ok", 0.5)
        assert scrape(a.port)['stm_agent_frames_processed_total{status="ok"}'] == 1
        assert scrape(b.port)['stm_agent_frames_processed_total{status="ok"}'] == 0
    finally:
        a.stop()
        b.stop()


def test_disabled_or_missing_prometheus_is_a_no_op(monkeypatch):
    for m in (AgentMetrics(enabled=False), NullMetrics(), build_metrics(MetricsConfig(enabled=False))):
        assert m.enabled is False and m.start() is m and m.port is None
        m.frame_done("ok", 0.1)
        m.set_queue_depth(3)
        m.stop()
    on = build_metrics(MetricsConfig(enabled=True, port=0))
    assert on.enabled is True and on.port is None  # built, not started
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    m = AgentMetrics(enabled=True, port=0)
    assert m.enabled is False and m.start().port is None
    m.frame_done("error", 1.0)
    m.stop()


def test_port_in_use_is_an_error():
    a = AgentMetrics(port=0).start()
    try:
        with pytest.raises(OSError):
            AgentMetrics(port=a.port).start()
    finally:
        a.stop()
