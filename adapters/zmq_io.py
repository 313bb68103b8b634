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

CURVE (opening the publisher to the lab): ``Publisher(curve_secret_file=...)`` serves with the key
pair of a ``zmq.auth`` certificate (encrypted, the agent proves who it is); with
``curve_clients_dir`` only subscribers whose public certificate lies in that folder get in (a ZAP
authenticator, :func:`curve_authenticator`). ``Subscriber(curve_server_key=...)`` pins the agent's
public key (and gives its own certificate with ``curve_secret_file`` when the agent lists clients).

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
from zmq.utils import z85

from stm_agent.agent.errors import PublishError
from stm_agent.agent.jsonsafe import jsonable

__all__ = ["Publisher", "Subscriber", "SCHEMA", "encode", "decode", "load_curve_secret", "curve_authenticator",
           "curve_client_keys"]

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


def curve_client_keys(server_key: str) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) Z85 keys for a CURVE client pinned to ``server_key``.

    Raises
    ------
    PublishError
        ``server_key`` is not a 40-character Z85 key, or libzmq was built without CURVE.
    """
    key = server_key.strip().encode("ascii", "replace")
    try:
        if len(key) != 40:
            raise ValueError(f"{len(key)} characters")
        z85.decode(key)
    except (KeyError, IndexError):
        raise PublishError("curve server key", "not a 40-character Z85 CURVE public key (a character outside "
                                               "the Z85 alphabet)") from None
    except ValueError as exc:
        raise PublishError("curve server key", f"not a 40-character Z85 CURVE public key ({exc})") from None
    if not zmq.has("curve"):
        raise PublishError("curve server key", "this libzmq has no CURVE support (libsodium)")
    public, secret = zmq.curve_keypair()
    return key, public, secret


def load_curve_secret(path: Any) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``zmq.auth`` secret certificate.

    Raises
    ------
    PublishError
        The file cannot be read, is not a secret certificate, or libzmq has no CURVE.
    """
    from zmq import auth as zmq_auth

    if not zmq.has("curve"):
        raise PublishError(str(path), "this libzmq has no CURVE support (libsodium)")
    try:
        public, secret = zmq_auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise PublishError(str(path), f"cannot read the CURVE certificate ({exc})") from exc
    if secret is None:
        raise PublishError(str(path), "not a secret certificate (give the .key_secret file)")
    return public, secret


_AUTHENTICATORS: dict[int, Any] = {}
_AUTH_LOCK = threading.Lock()


def curve_authenticator(context: zmq.Context, clients_dir: Any) -> Any:
    """Start (once per context) a ZAP authenticator that admits only the CURVE clients whose public
    certificates (``*.key``, zmq.auth format) lie in ``clients_dir``.

    Raises
    ------
    PublishError
        ``clients_dir`` is not a folder.
    """
    from pathlib import Path

    from zmq.auth.thread import ThreadAuthenticator

    folder = Path(clients_dir)
    if not folder.is_dir():
        raise PublishError(str(folder), "publish.curve_clients_dir is not a folder of client certificates")
    with _AUTH_LOCK:
        auth = _AUTHENTICATORS.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
            auth.start()
            _AUTHENTICATORS[id(context)] = auth
        auth.configure_curve(domain="*", location=str(folder))
    return auth


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
    curve_secret_file : path, optional
        Serve with CURVE using this ``zmq.auth`` secret certificate.
    curve_clients_dir : path, optional
        With CURVE: admit only the subscribers whose public certificates lie in this folder.

    Raises
    ------
    PublishError
        The endpoint cannot be bound (address in use, malformed endpoint), or a CURVE
        certificate / client folder cannot be read.
    """

    def __init__(self, endpoint: str, sndhwm: int = 10000, linger_ms: int = 1000, agent_id: str = "stm-agent",
                 context: zmq.Context | None = None, seq: Callable[[], int] | None = None,
                 curve_secret_file: Any = None, curve_clients_dir: Any = None):
        self.agent_id = agent_id
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._next_seq = seq if seq is not None else itertools.count(1).__next__
        keys = load_curve_secret(curve_secret_file) if curve_secret_file is not None else None
        if curve_clients_dir is not None:
            if keys is None:
                raise PublishError(endpoint, "publish.curve_clients_dir needs publish.curve_secret_file")
            curve_authenticator(self._ctx, curve_clients_dir)
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        self._sock.setsockopt(zmq.LINGER, int(linger_ms))
        if keys is not None:
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = keys
        self.curve_public_key: str | None = keys[0].decode("ascii") if keys else None
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
    curve_server_key : str, optional
        The agent's CURVE public key (Z85, 40 characters): connect with CURVE, to that agent only.
    curve_secret_file : path, optional
        With ``curve_server_key``: this subscriber's own ``zmq.auth`` secret certificate (needed
        when the agent admits listed clients only); default a fresh key pair.

    Raises
    ------
    PublishError
        The endpoint is malformed, or a CURVE key / certificate is not valid.
    """

    def __init__(self, endpoint: str, topics: Iterable[str] = ("",), rcvhwm: int = 10000,
                 context: zmq.Context | None = None, curve_server_key: str | None = None,
                 curve_secret_file: Any = None):
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        keys = None
        if curve_server_key:
            server, public, secret = curve_client_keys(curve_server_key)
            if curve_secret_file is not None:
                public, secret = load_curve_secret(curve_secret_file)
            keys = (server, public, secret)
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        self._sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = keys
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
