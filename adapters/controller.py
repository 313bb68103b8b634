"""Controller feed source: frames pushed by the STM controller over ZeroMQ.

Two modes (``controller.ack``):

* **PUB/SUB** (default): the controller (or ``stm-agent replay``) BINDS a PUB/XPUB socket; this
  source CONNECTS a SUB socket to ``cfg.endpoint`` and subscribes to ``cfg.topics``. Messages are
  multipart ``[topic, JSON header, payload]``. Nothing is acknowledged: what ZeroMQ has not yet
  handed to the agent when it is killed (kill -9) is lost with the process.
* **Acknowledged** (``ack: true``): the controller BINDS a ROUTER socket; this source CONNECTS a
  DEALER. It announces itself with ``[b"ready"]`` (again every :data:`READY_EVERY_S`), receives
  ``[b"frame", msg_id, topic, JSON header, payload]`` and answers ``[b"ack", msg_id, status]``
  (status ``stored`` | ``duplicate`` | ``rejected``) only once the frame is committed to the
  store's inbox (or known, or malformed). The controller keeps every frame until it is
  acknowledged and sends it again after a timeout or to a restarted agent (a new ``ready``);
  :class:`adapters.replay.ReplayFeed` with ``ack=True`` is that controller side. A frame re-sent
  after it was stored is acknowledged as ``duplicate`` (same sha256), so nothing is recorded twice.

Topics (:mod:`adapters.arrayscan`):

* ``scan.sxm``: payload = raw .sxm file bytes -> ``Arrival(kind="sxm")``. Not parsed here: a broken
  scan is a frame the agent records as an error (its reader says why).
* ``scan.array``: header describes the raw array payload -> ``Arrival(kind="array")``. The header is
  checked here with :func:`adapters.arrayscan.validate_array_header`, the same check the agent's
  :func:`adapters.arrayscan.scan_from_array` makes, so what is accepted here can be read there.
* ``scan.saved``: header ``{"path": ...}`` -> the file is read safely (:mod:`adapters.files`: it must
  resolve inside the acquisition roots, be a regular file, bounded) and hashed ->
  ``Arrival(kind="file")``; a file that is refused or cannot be read gives an error Arrival
  (recorded, not lost, counted in ``stats()["refused"]`` / ``errors``).

frame_id = sha256 of the payload (or file) bytes. Structurally malformed messages are counted per
reason in ``stats()["malformed"]`` and logged at most once per 10 s per reason; nothing a peer
sends stops the thread.

Nothing received is dropped (issue 15, finding 8): when ``submit`` cannot write (disk full, store
locked) the source keeps the frame, receives nothing more (ZeroMQ queues up to RCVHWM, then the
controller's side holds or drops, by its own settings) and tries again with a growing pause. On
:meth:`ControllerSource.stop` it unsubscribes, then takes what is already on its way for up to
``drain_s`` seconds before it closes the socket.

Memory (finding 7): ZeroMQ holds at most RCVHWM messages in the receive queue, and RCVHWM is
lowered to ``max_queue_mb / max_payload_mb`` (at least 1), so the queue holds at most about
``max_queue_mb`` of payload. A payload larger than ``max_payload_mb`` is rejected (counted
``payload_too_large``, acknowledged as ``rejected``) after it has been received: ZeroMQ can refuse
a message before receiving it only by ZMQ_MAXMSGSIZE, which drops the connection, so that is kept
for absurd sizes only (``max_message_mb``, default 2 x ``max_payload_mb``): beyond it the
controller is disconnected (ZeroMQ reconnects within 0.1 s; in PUB/SUB mode what it had queued
for the agent is lost, in ack mode it is sent again).

Security (``curve_server_key``): ``tcp://`` to a port anyone on the computer can bind first means
whoever binds it first is obeyed. Pin the controller's CURVE public key (Z85, 40 characters): the
agent then takes frames only from a peer that proves it holds the matching secret key (the
agent's own key pair is made at start). Or use ``ipc:///path`` in a folder only the lab user can
write (file permissions decide who may bind).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import zmq

from stm_agent.adapters.arrayscan import TOPICS, ArrayHeaderError, validate_array_header
from stm_agent.adapters.arrival import Arrival, now_utc
from stm_agent.adapters.files import Roots, read_regular
from stm_agent.adapters.ratelog import RateLimitedLog, clip
from stm_agent.adapters.zmq_io import curve_client_keys
from stm_agent.adapters.sxm import MAX_FILE_BYTES
from stm_agent.agent.config import ControllerConfig
from stm_agent.agent.errors import PublishError, RefusedPathError, StmAgentError

__all__ = ["ControllerSource", "READY_EVERY_S", "effective_rcvhwm"]

log = logging.getLogger(__name__)

_POLL_MS = 100
_RECENT = 4096  # frame_ids handed on recently, remembered to skip immediate repeats
#: Ack mode: the agent says ``ready`` this often, so a (re)started controller finds it, s.
READY_EVERY_S = 1.0
_RETRY_MAX_S = 2.0  # longest pause between two attempts to write a received frame
_LOG_EVERY_S = 10.0  # repeated warnings (malformed messages, disk full) at most once per key per this


def effective_rcvhwm(cfg: ControllerConfig) -> int:
    """ZMQ_RCVHWM used: ``cfg.rcvhwm``, lowered so that the queue holds at most ``max_queue_mb`` of
    payloads of ``max_payload_mb`` each (at least 1 message)."""
    by_memory = int(cfg.max_queue_mb // cfg.max_payload_mb)
    return max(1, min(int(cfg.rcvhwm), by_memory))


class _Unstored(Exception):
    """A received frame could not be written before the source had to stop."""


class _Malformed(Exception):
    """A message that does not follow the wire format: ``key`` counts it, ``reason`` explains it."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(reason)


class ControllerSource:
    """Receives ``scan.sxm`` / ``scan.array`` / ``scan.saved`` messages and submits Arrivals.

    Parameters
    ----------
    cfg : ControllerConfig
        ``endpoint`` (connected, the controller binds), ``topics``, ``rcvhwm`` / ``max_queue_mb``
        (ZMQ_RCVHWM, see :func:`effective_rcvhwm`), ``max_payload_mb`` (larger payloads are
        malformed), ``max_message_mb`` (ZMQ_MAXMSGSIZE), ``drain_s``, ``ack``, ``curve_server_key``.
    submit : callable(Arrival) -> bool | None
        Called from this source's thread once per new frame; returns False when the frame is
        already recorded or waiting (a duplicate). :class:`agent.errors.StmAgentError` or
        :class:`OSError` (disk full, store locked) are retried until they succeed or the source
        stops (``submit_retries``); any other exception is logged and counted (``submit_errors``).
    known : callable(frame_id) -> bool, optional
        True for frames already processed; they are skipped (``duplicates``). The agent leaves it
        out: its ``submit`` checks the store once.
    context : zmq.Context, optional
        Defaults to ``zmq.Context.instance()``.
    roots : Roots, optional
        Folders ``scan.saved`` paths must resolve into (the agent passes the acquisition roots);
        None = any path (regular files only, bounded).

    Notes
    -----
    ``stats()`` keys: ``endpoint``, ``alive``, ``mode`` (``sub`` | ``ack``), ``rcvhwm``,
    ``received`` (messages), ``submitted`` (Arrivals, errors included), ``duplicates``,
    ``submit_errors``, ``submit_retries``, ``unstored`` (received, never written: the source had
    to stop while the disk stayed full; in ack mode the controller sends them again), ``acked``,
    ``errors`` (error Arrivals, e.g. a saved file that cannot be read), ``malformed`` (dict reason
    -> count). Reasons: ``frames`` (not 2 or 3 frames), ``topic`` (not UTF-8 / unknown),
    ``header_utf8``, ``header_json``, ``header_object``, ``payload_missing``, ``payload_unexpected``,
    ``payload_too_large``, ``payload_size`` (array payload length does not match shape x dtype),
    ``field:<name>`` (missing/invalid header field), ``envelope`` (ack mode: not
    ``[frame, msg_id, ...]``), ``internal``.
    """

    name = "controller"

    def __init__(self, cfg: ControllerConfig, submit: Callable[[Arrival], None],
                 known: Callable[[str], bool] = lambda fid: False, context: zmq.Context | None = None,
                 roots: Roots | None = None):
        self.cfg = cfg
        self.roots = roots
        self.endpoint = cfg.endpoint
        self._submit = submit
        self._known = known
        self._ctx = context or zmq.Context.instance()
        self._max_payload = int(cfg.max_payload_mb * (1 << 20))
        max_msg = cfg.max_message_mb if cfg.max_message_mb is not None else 2 * cfg.max_payload_mb
        self._max_message = max(int(max_msg * (1 << 20)), self._max_payload + (1 << 20))
        self.rcvhwm = effective_rcvhwm(cfg)
        self.ack = bool(cfg.ack)
        self._stop = threading.Event()
        self._drain_until = float("inf")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._counts = {"received": 0, "submitted": 0, "duplicates": 0, "submit_errors": 0, "submit_retries": 0,
                        "unstored": 0, "acked": 0, "errors": 0, "refused": 0}
        self._malformed: dict[str, int] = {}
        self._rl = RateLimitedLog(log, _LOG_EVERY_S)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect the SUB socket and start the receiving thread (no-op when running).

        Raises
        ------
        PublishError
            The endpoint is malformed (message names it).
        """
        if self._thread is not None and self._thread.is_alive():
            return
        try:
            keys = curve_client_keys(self.cfg.curve_server_key) if self.cfg.curve_server_key else None
        except PublishError as exc:
            raise PublishError("controller.curve_server_key", exc.reason) from None
        sock = self._ctx.socket(zmq.DEALER if self.ack else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise PublishError(self.endpoint, f"cannot connect the controller {'DEALER' if self.ack else 'SUB'} "
                                              f"socket ({exc})") from exc
        if not self.ack:
            for t in self.cfg.topics:
                sock.setsockopt(zmq.SUBSCRIBE, t.encode("utf-8"))
        self._stop.clear()
        self._drain_until = float("inf")
        # the socket is used only by the thread from here on (the thread start is a memory barrier)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="stm-agent-controller", daemon=True)
        self._thread.start()
        log.info("controller feed: %s %s (topics %s, RCVHWM %d%s)", "acknowledged mode, DEALER to" if self.ack
                 else "subscribed to", self.endpoint, ", ".join(self.cfg.topics), self.rcvhwm,
                 ", CURVE with a pinned server key" if keys else "")

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop receiving and close the socket (idempotent).

        PUB/SUB mode: the source unsubscribes, then keeps taking the messages already on their way
        (each one written to the inbox) until none arrives for 0.2 s or ``cfg.drain_s`` has passed.
        Ack mode: it stops at once (what was not acknowledged is sent again by the controller).
        Waits at most ``timeout_s`` (default ``drain_s`` + 5 s).
        """
        drain = 0.0 if self.ack else float(self.cfg.drain_s)
        self._drain_until = time.monotonic() + drain
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(drain + 5.0 if timeout_s is None else timeout_s)
            if t.is_alive():
                log.warning("controller feed: thread did not stop within %.1f s", drain + 5.0 if timeout_s is None
                            else timeout_s)

    def stats(self) -> dict[str, Any]:
        """Counters for the heartbeat (JSON-able; see the class notes)."""
        with self._lock:
            return {"endpoint": self.endpoint, "alive": bool(self._thread and self._thread.is_alive()),
                    "mode": "ack" if self.ack else "sub", "rcvhwm": self.rcvhwm,
                    **self._counts, "malformed": dict(self._malformed)}

    # ------------------------------------------------------------------ thread
    def _run(self, sock: zmq.Socket) -> None:
        next_ready = 0.0
        try:
            while not self._stop.is_set():
                if self.ack and time.monotonic() >= next_ready:
                    self._send(sock, [b"ready"])
                    next_ready = time.monotonic() + READY_EVERY_S
                if not self._receive(sock, _POLL_MS):
                    continue
            if not self.ack:
                self._drain(sock)
        except _Unstored:
            pass
        finally:
            sock.close(linger=0)
            with self._lock:
                c = dict(self._counts)
            log.info("controller feed: stopped (%s): %d received, %d submitted, %d duplicates, %d not written",
                     self.endpoint, c["received"], c["submitted"], c["duplicates"], c["unstored"])

    def _receive(self, sock: zmq.Socket, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for one message and handle it; False when none came."""
        try:
            if not sock.poll(timeout_ms, zmq.POLLIN):
                return False
            raw = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)  # sizes first: no copy of a refused payload
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if self._stop.is_set():
                raise _Unstored() from None
            self._rl.log(logging.ERROR, "recv", "controller feed: receive failed (%s)", exc)
            time.sleep(_POLL_MS / 1000)
            return False
        self._count("received")
        big = max((len(f) for f in raw), default=0)
        if big > self._max_payload:
            topic = raw[0].bytes[:60].decode("utf-8", "replace") if raw and len(raw[0]) <= 256 else "?"
            self._bad("payload_too_large", f"{topic}: a message frame of {big} bytes exceeds max_payload_mb = "
                                           f"{self.cfg.max_payload_mb}")
            if self.ack and len(raw) >= 2 and len(raw[1]) <= 256:
                self._send(sock, [b"ack", raw[1].bytes, b"rejected"])
            return True
        frames = [f.bytes for f in raw]
        del raw
        msg_id = None
        if self.ack:
            if len(frames) < 2 or frames[0] != b"frame":
                self._bad("envelope", f"expected [frame, msg_id, topic, header, payload], got {len(frames)} "
                                      f"frame(s) starting {clip(frames[0][:20] if frames else b'')}")
                return True
            msg_id, frames = frames[1], frames[2:]
        status = "rejected"
        try:
            status = self._handle(frames)
        except _Malformed as m:
            self._bad(m.key, m.reason)
        except _Unstored:
            raise  # not written and not acknowledged: the controller (ack mode) sends it again
        except Exception as exc:  # noqa: BLE001 - one message never kills the source
            log.exception("controller feed: message not handled")
            self._bad("internal", f"{type(exc).__name__}: {exc}")
        if msg_id is not None:
            if self._send(sock, [b"ack", msg_id, status.encode("ascii")]):
                self._count("acked")
        return True

    def _drain(self, sock: zmq.Socket) -> None:
        """Unsubscribe, then take what is already on its way (see :meth:`stop`)."""
        try:
            for t in self.cfg.topics:
                sock.setsockopt(zmq.UNSUBSCRIBE, t.encode("utf-8"))
        except zmq.ZMQError:
            return
        n0 = self._counts["received"]
        while time.monotonic() < self._drain_until:
            if not self._receive(sock, 200):
                break
        if self._counts["received"] > n0:
            log.info("controller feed: took %d message(s) already on their way before closing",
                     self._counts["received"] - n0)

    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # no controller connected (Again) or closing: it re-sends, we re-announce
            return False

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _bad(self, key: str, reason: str) -> None:
        with self._lock:
            self._malformed[key] = self._malformed.get(key, 0) + 1
        self._rl.log(logging.WARNING, f"malformed:{key}", "controller feed %s: malformed message ignored (%s): %s",
                     self.endpoint, key, clip(reason))

    def _handle(self, frames: list[bytes]) -> str:
        """Check one multipart message and submit its Arrival; ``stored`` or ``duplicate``.

        Raises _Malformed (the message does not follow the wire format) or _Unstored (it could
        not be written before the source had to stop)."""
        if len(frames) not in (2, 3):
            raise _Malformed("frames", f"expected 2 or 3 frames [topic, header, payload], got {len(frames)}")
        try:
            topic = frames[0].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("topic", f"topic is not UTF-8: {frames[0][:40]!r}") from None
        if topic not in TOPICS:
            raise _Malformed("topic", f"unknown topic {topic[:60]!r} (expected one of {', '.join(TOPICS)})")
        try:
            text = frames[1].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("header_utf8", f"{topic}: header is not UTF-8") from None
        try:
            header = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _Malformed("header_json", f"{topic}: header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _Malformed("header_object", f"{topic}: header is a JSON {type(header).__name__}, not an object")
        payload = frames[2] if len(frames) == 3 else b""
        if len(payload) > self._max_payload:
            raise _Malformed("payload_too_large", f"{topic}: payload of {len(payload)} bytes exceeds "
                                                  f"max_payload_mb = {self.cfg.max_payload_mb}")
        if topic == "scan.saved":
            if payload:
                raise _Malformed("payload_unexpected", f"scan.saved carries no payload, got {len(payload)} bytes")
            return self._saved(header)
        if not payload:
            raise _Malformed("payload_missing", f"{topic}: no payload frame")
        if topic == "scan.array":
            try:
                validate_array_header(header, len(payload), source=f"controller:{header.get('name') or topic}")
            except ArrayHeaderError as exc:
                key = "payload_size" if exc.field == "payload" else f"field:{exc.field}"
                raise _Malformed(key, str(exc)) from None
        kind = "sxm" if topic == "scan.sxm" else "array"
        fid = hashlib.sha256(payload).hexdigest()
        return self._hand_on(Arrival(path=None, frame_id=fid, size=len(payload), received_at=now_utc(),
                              received_mono=time.monotonic(), source=self.name, kind=kind,
                              payload=payload, meta=header))

    def _saved(self, header: dict[str, Any]) -> str:
        raw = header.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise _Malformed("field:path", f"scan.saved: header field 'path' must be a non-empty text, got {raw!r}")
        path = Path(raw)
        received_at, mono = now_utc(), time.monotonic()
        try:
            data, _ = read_regular(path, self.roots, MAX_FILE_BYTES)
        except (OSError, RefusedPathError) as exc:
            refused = isinstance(exc, RefusedPathError)
            why = exc.reason if refused else (exc.strerror or str(exc))
            reason = f"controller scan.saved: {'refused' if refused else 'cannot read'} {raw[:300]} ({why})"
            log.warning("%s", reason)
            if refused:
                self._count("refused")
            fid = hashlib.sha256(b"missing:" + raw.encode("utf-8", "surrogateescape")).hexdigest()
            return self._hand_on(Arrival(path=path, frame_id=fid, size=0, received_at=received_at,
                                         received_mono=mono, error=reason, source=self.name, kind="file",
                                         meta=header))
        return self._hand_on(Arrival(path=path, frame_id=hashlib.sha256(data).hexdigest(), size=len(data),
                                     received_at=received_at, received_mono=mono, source=self.name, kind="file",
                                     meta=header, data=data))

    def _hand_on(self, item: Arrival) -> str:
        fid = item.frame_id
        try:
            seen = fid in self._recent or bool(self._known(fid))
        except Exception as exc:  # noqa: BLE001 - the store cannot say: process it (twice beats never)
            self._rl.log(logging.WARNING, "known", "controller feed: cannot check frame %s against the store (%s)",
                         fid[:12], exc)
            seen = False
        if seen:
            return self._duplicate(item)
        try:
            new = self._submit_retrying(item)
        except _Unstored:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in submit: log, count, go on
            self._count("submit_errors")
            log.error("controller feed: %s (sha256 %s) could not be submitted: %s", item.name, fid[:12], exc)
            return "rejected"
        self._recent[fid] = None
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        if new is False:
            return self._duplicate(item)
        self._count("submitted")
        if item.error:
            self._count("errors")
        return "stored"

    def _duplicate(self, item: Arrival) -> str:
        self._count("duplicates")
        log.info("controller feed: %s skipped, same content (sha256 %s) already received", item.name,
                 item.frame_id[:12])
        return "duplicate"

    def _submit_retrying(self, item: Arrival) -> bool | None:
        """``submit(item)``, retried while it fails with StmAgentError/OSError (disk full, store
        locked) until it succeeds or the source must stop (then :class:`_Unstored`)."""
        pause = 0.05
        while True:
            try:
                return self._submit(item)
            except (StmAgentError, OSError) as exc:
                self._count("submit_retries")
                if self._stop.is_set() and time.monotonic() >= self._drain_until:
                    self._count("unstored")
                    if self.ack:
                        log.warning("controller feed: %s (sha256 %s) not written before stopping (%s); not "
                                    "acknowledged, the controller sends it again", item.name, item.frame_id[:12], exc)
                    else:
                        log.error("controller feed: %s (sha256 %s) received but LOST: it could not be written "
                                  "before stopping (%s)", item.name, item.frame_id[:12], exc)
                    raise _Unstored() from exc
                self._rl.log(logging.ERROR, "submit", "controller feed: %s (sha256 %s) cannot be written into the "
                             "inbox (%s); holding it and receiving nothing more until it can", item.name,
                             item.frame_id[:12], exc)
                time.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_S)
