"""ZeroMQ publish/subscribe with real sockets on 127.0.0.1: JSON multipart, schema header, seq."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from stm_agent.adapters.sxm import read_sxm
from stm_agent.adapters.zmq_io import SCHEMA, Publisher, Subscriber, encode
from stm_agent.agent.errors import PublishError


def _join(pub: Publisher, sub: Subscriber, timeout_s: float = 5.0) -> None:
    """Beat the slow-joiner: publish pings until the subscriber receives one."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        pub.publish("test.ping", {})
        got = sub.recv(timeout_ms=50)
        if got is not None:
            while sub.recv(timeout_ms=50) is not None:  # drain the other pings
                pass
            return
    pytest.fail(f"subscriber never joined {pub.endpoint}")


def test_publish_subscribe_real_scan_summary(sxm_dir):
    scan = read_sxm(sxm_dir / "porphyrin_pair_128_up_nan51pct.sxm")
    with Publisher("tcp://127.0.0.1:*", sndhwm=50, linger_ms=200, agent_id="stm-lab1") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith("*")
        assert pub._sock.getsockopt(zmq.SNDHWM) == 50 and pub._sock.getsockopt(zmq.LINGER) == 200
        with Subscriber(pub.endpoint, ["test.", "frame.counts"]) as sub:
            _join(pub, sub)
            sent = pub.publish("frame.counts", {"frame_id": scan.frame_id, "scan": scan.summary(),
                                                "n": np.int64(3), "v": np.float32(0.5), "bad": float("nan")})
            pub.publish("agent.heartbeat", {"uptime_s": 1.0})  # not subscribed: filtered out
            sent2 = pub.publish("frame.counts", {"frame_id": scan.frame_id})
            topic, msg = sub.recv(timeout_ms=2000)
            assert topic == "frame.counts"
            assert msg["schema"] == SCHEMA == 1 and msg["agent_id"] == "stm-lab1"
            assert msg["seq"] == sent["seq"] and msg["frame_id"] == scan.frame_id
            assert msg["scan"]["pixels"] == [128, 128] and msg["scan"]["direction"] == "up"
            assert msg["n"] == 3 and msg["v"] == 0.5 and msg["bad"] is None
            topic2, msg2 = sub.recv(timeout_ms=2000)
            assert topic2 == "frame.counts" and msg2["seq"] == sent2["seq"] == sent["seq"] + 2
            assert sub.recv(timeout_ms=200) is None


def test_wire_format_is_two_frames_of_json():
    with Publisher("tcp://127.0.0.1:*") as pub:
        ctx = zmq.Context.instance()
        raw = ctx.socket(zmq.SUB)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(pub.endpoint)
        try:
            end = time.monotonic() + 5
            frames = None
            while frames is None and time.monotonic() < end:
                pub.publish("agent.status", {"state": "started"})
                if raw.poll(50):
                    frames = raw.recv_multipart()
            assert frames is not None
            assert len(frames) == 2 and frames[0] == b"agent.status"
            body = json.loads(frames[1].decode("utf-8"))  # plain JSON, never pickle
            assert body["state"] == "started" and body["schema"] == 1 and isinstance(body["seq"], int)
        finally:
            raw.close()


def test_subscriber_skips_malformed_messages():
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.bind("tcp://127.0.0.1:*")
    ep = rogue.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        with Subscriber(ep) as sub:
            end = time.monotonic() + 5
            while time.monotonic() < end:  # slow joiner
                rogue.send_multipart([b"x", b"{}"])
                if sub.recv(timeout_ms=50):
                    break
            while sub.recv(timeout_ms=50):
                pass
            rogue.send_multipart([b"frame.counts", b"\x80\x04pickle?"])
            rogue.send_multipart([b"frame.counts"])
            rogue.send_multipart([b"frame.counts", b"[1, 2]"])
            rogue.send_multipart([b"frame.counts", b'{"ok": true}'])
            got = sub.recv(timeout_ms=2000)
            assert got == ("frame.counts", {"ok": True})
            assert sub.rejected == 3
    finally:
        rogue.close()


def test_bind_conflict_and_bad_input_are_typed_errors():
    with Publisher("tcp://127.0.0.1:*") as pub:
        with pytest.raises(PublishError) as e:
            Publisher(pub.endpoint)
        assert pub.endpoint in str(e.value)
    with pytest.raises(PublishError):
        Publisher("not-an-endpoint")
    with pytest.raises(PublishError):
        encode("", {})
    with pytest.raises(PublishError):
        encode("frame.counts", [1, 2])  # type: ignore[arg-type]
    pub = Publisher("tcp://127.0.0.1:*")
    pub.close()
    with pytest.raises(PublishError):
        pub.publish("frame.counts", {})
