"""ZeroMQ publish/subscribe of the agent's messages (pyzmq), JSON only.

Wire format: multipart ``[topic, json]``; ``topic`` is UTF-8 text (``frame.counts``,
``frame.detections``, ``agent.status``, ``agent.heartbeat`` ...) that subscribers filter on by
prefix, ``json`` is a UTF-8 JSON object. Never pickle: a subscriber must not execute what a
publisher sends. Every message carries ``schema`` (:data:`SCHEMA`), ``agent_id`` and ``seq`` (an
integer increasing by one per message of this publisher, so a subscriber can see drops), plus
``frame_id`` where the message is about a frame. Non-finite floats are sent as ``null`` (standard
JSON has no NaN).

Socket options are set deliberately:

* ``SNDHWM`` (publisher): messages queued per subscriber before ZeroMQ drops new ones for that
  subscriber (PUB never blocks the agent on a slow subscriber).
* ``LINGER``: how long unsent messages are kept on close; bounded so that stopping never hangs.
* ``RCVHWM`` (subscriber): messages queued before the subscriber's side drops.

The usual ZeroMQ "slow joiner" caveat applies: a subscriber that connects after a message was
published never sees it; subscribers that must not miss the first frame wait for the periodic
``agent.heartbeat`` before they rely on the stream.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from typing import Any, Callable, Iterable

import zmq

from stm_agent.agent.errors import PublishError
from stm_agent.agent.jsonsafe import jsonable

__all__ = ["Publisher", "Subscriber", "SCHEMA", "encode", "decode"]

log = logging.getLogger(__name__)

SCHEMA = 1


def encode(topic: str, message: dict[str, Any]) -> list[bytes]:
    """Encode one message as the multipart frames ``[topic (UTF-8), JSON (UTF-8)]``.

    Raises
    ------
    PublishError
        ``topic`` is empty or not text, or ``message`` is not a dict.
    """
    if not isinstance(topic, str) or not topic:
        raise PublishError(repr(topic), "a topic must be non-empty text")
    if not isinstance(message, dict):
        raise PublishError(topic, f"a message must be a dict, got {type(message).__name__}")
    body = json.dumps(jsonable(message), allow_nan=False, separators=(",", ":"))
    return [topic.encode("utf-8"), body.encode("utf-8")]


def decode(frames: list[bytes], source: str = "zmq") -> tuple[str, dict[str, Any]]:
    """Decode multipart frames ``[topic, json]`` into ``(topic, dict)``.

    Raises
    ------
    PublishError
        Not two frames, not UTF-8, not a JSON object.
    """
    if len(frames) != 2:
        raise PublishError(source, f"expected 2 message frames [topic, json], got {len(frames)}")
    try:
        topic = frames[0].decode("utf-8")
        msg = json.loads(frames[1].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(source, f"message is not UTF-8 JSON ({exc})") from exc
    if not isinstance(msg, dict):
        raise PublishError(source, f"message on {topic!r} is not a JSON object")
    return topic, msg


class Publisher:
    """A bound ZeroMQ PUB socket that sends JSON messages (thread-safe).

    Parameters
    ----------
    endpoint : str
        Where to bind, e.g. ``tcp://127.0.0.1:5556`` (only this computer) or ``tcp://127.0.0.1:*``
        (a free port; read :attr:`endpoint` afterwards).
    sndhwm : int
        ZMQ_SNDHWM, messages queued per subscriber before ZeroMQ drops new ones.
    linger_ms : int
        ZMQ_LINGER, ms unsent messages are kept on :meth:`close`.
    agent_id : str
        Put in every message.
    context : zmq.Context, optional
        Defaults to the process-wide ``zmq.Context.instance()``.
    seq : callable() -> int, optional
        Source of sequence numbers (called under the publisher's lock, must increase); default
        1, 2, 3 ... for this publisher. The agent passes one backed by the results store, so that
        ``seq`` keeps increasing across restarts.

    Raises
    ------
    PublishError
        The endpoint cannot be bound (address in use, malformed endpoint).
    """

    def __init__(self, endpoint: str, sndhwm: int = 10000, linger_ms: int = 1000, agent_id: str = "stm-agent",
                 context: zmq.Context | None = None, seq: Callable[[], int] | None = None):
        self.agent_id = agent_id
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._next_seq = seq if seq is not None else itertools.count(1).__next__
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        self._sock.setsockopt(zmq.LINGER, int(linger_ms))
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise PublishError(endpoint, f"cannot bind the ZeroMQ PUB socket ({exc})") from exc
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sent = 0

    def publish(self, topic: str, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` on ``topic``, adding ``schema``, ``agent_id`` and ``seq``.

        Never blocks: when a subscriber's queue is full (SNDHWM) ZeroMQ drops the message for it.

        Returns
        -------
        dict
            The message as sent (with the header fields).

        Raises
        ------
        PublishError
            Bad topic/message, or the publisher is closed.
        """
        with self._lock:
            if self._sock is None:
                raise PublishError(self.endpoint, "publisher is closed")
            full = {"schema": SCHEMA, "agent_id": self.agent_id, "seq": self._next_seq(), **message}
            frames = encode(topic, full)
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:  # PUB drops rather than blocks; kept for completeness
                log.warning("%s: message %s seq %d dropped (send queue full)", self.endpoint, topic, full["seq"])
            self.sent += 1
            return full

    def close(self) -> None:
        """Close the socket (pending messages are kept up to LINGER ms). Idempotent."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscriber:
    """A ZeroMQ SUB socket connected to an agent, receiving ``(topic, dict)`` messages.

    Parameters
    ----------
    endpoint : str
        The publisher's endpoint, e.g. ``tcp://127.0.0.1:5556``.
    topics : iterable of str
        Topic prefixes to receive (``""`` = everything). Default: everything.
    rcvhwm : int
        ZMQ_RCVHWM, messages queued on the subscriber's side.
    context : zmq.Context, optional

    Raises
    ------
    PublishError
        The endpoint is malformed.
    """

    def __init__(self, endpoint: str, topics: Iterable[str] = ("",), rcvhwm: int = 10000,
                 context: zmq.Context | None = None):
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise PublishError(endpoint, f"cannot connect the ZeroMQ SUB socket ({exc})") from exc
        topics = list(topics) or [""]
        for t in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode("utf-8"))
        self.rejected = 0  # messages that were not [topic, JSON object]

    def recv(self, timeout_ms: int = 1000) -> tuple[str, dict[str, Any]] | None:
        """Wait up to ``timeout_ms`` for the next message.

        Messages that are not ``[topic, JSON object]`` are logged, counted in :attr:`rejected` and
        skipped (a listener keeps listening).

        Returns
        -------
        (topic, message) or None
            None when nothing arrived in time.
        """
        deadline = time.monotonic() + max(int(timeout_ms), 0) / 1000.0
        while True:
            left_ms = max(int((deadline - time.monotonic()) * 1000), 0)
            if not self._sock.poll(left_ms, zmq.POLLIN):
                return None
            frames = self._sock.recv_multipart()
            try:
                return decode(frames, self.endpoint)
            except PublishError as exc:
                self.rejected += 1
                log.warning("ignored a malformed message: %s", exc)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None  # type: ignore[assignment]

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
