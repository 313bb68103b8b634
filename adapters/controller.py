"""Controller feed source: frames pushed by the STM controller over ZeroMQ.

The controller (or ``stm-agent replay``) BINDS a PUB/XPUB socket; this source CONNECTS a SUB socket
to ``cfg.endpoint``, subscribes to ``cfg.topics`` and hands every frame on as an
:class:`adapters.arrival.Arrival`. Wire format (docs/sources.md, :mod:`adapters.arrayscan`):
multipart ``[topic, JSON header, payload]``:

* ``scan.sxm``: payload = raw .sxm file bytes -> ``Arrival(kind="sxm")``. Not parsed here: a broken
  scan is a frame the agent records as an error (its reader says why).
* ``scan.array``: header describes the raw array payload -> ``Arrival(kind="array")``. The header is
  checked here with :func:`adapters.arrayscan.validate_array_header`, the same check the agent's
  :func:`adapters.arrayscan.scan_from_array` makes, so what is accepted here can be read there.
* ``scan.saved``: header ``{"path": ...}`` -> the file is hashed -> ``Arrival(kind="file")``; a file
  that cannot be read gives an error Arrival (recorded, not lost).

frame_id = sha256 of the payload (or file) bytes. Structurally malformed messages are logged and
counted per reason in ``stats()["malformed"]``; nothing a peer sends stops the thread.
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
from stm_agent.adapters.folder import sha256_file
from stm_agent.agent.config import ControllerConfig
from stm_agent.agent.errors import PublishError

__all__ = ["ControllerSource"]

log = logging.getLogger(__name__)

_POLL_MS = 100
_RECENT = 4096  # frame_ids handed on recently, remembered to skip immediate repeats


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
        ``endpoint`` (connected, the controller binds), ``topics``, ``rcvhwm`` (ZMQ_RCVHWM,
        messages queued before ZeroMQ drops), ``max_payload_mb`` (larger payloads are malformed).
    submit : callable(Arrival)
        Called from this source's thread once per new frame; it may raise (store full/locked):
        that is logged and counted (``submit_errors``) and the source goes on.
    known : callable(frame_id) -> bool
        True for frames already processed; they are skipped (``duplicates``).
    context : zmq.Context, optional
        Defaults to ``zmq.Context.instance()``.

    Notes
    -----
    ``stats()`` keys: ``endpoint``, ``alive``, ``received`` (messages), ``submitted`` (Arrivals, errors included), ``duplicates``,
    ``submit_errors``, ``errors`` (error Arrivals, e.g. a saved file that cannot be read),
    ``malformed`` (dict reason -> count). Reasons: ``frames`` (not 2 or 3 frames), ``topic``
    (not UTF-8 / unknown), ``header_utf8``, ``header_json``, ``header_object``, ``payload_missing``,
    ``payload_unexpected``, ``payload_too_large``, ``payload_size`` (array payload length does not
    match shape x dtype), ``field:<name>`` (missing/invalid header field), ``internal``.
    """

    name = "controller"

    def __init__(self, cfg: ControllerConfig, submit: Callable[[Arrival], None],
                 known: Callable[[str], bool] = lambda fid: False, context: zmq.Context | None = None):
        self.cfg = cfg
        self.endpoint = cfg.endpoint
        self._submit = submit
        self._known = known
        self._ctx = context or zmq.Context.instance()
        self._max_payload = int(cfg.max_payload_mb * (1 << 20))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._counts = {"received": 0, "submitted": 0, "duplicates": 0, "submit_errors": 0, "errors": 0}
        self._malformed: dict[str, int] = {}

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
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, int(self.cfg.rcvhwm))
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise PublishError(self.endpoint, f"cannot connect the controller SUB socket ({exc})") from exc
        for t in self.cfg.topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode("utf-8"))
        self._stop.clear()
        # the socket is used only by the thread from here on (the thread start is a memory barrier)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="stm-agent-controller", daemon=True)
        self._thread.start()
        log.info("controller feed: listening on %s (topics %s)", self.endpoint, ", ".join(self.cfg.topics))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and close the socket (idempotent; waits at most ``timeout_s``)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)
            if t.is_alive():
                log.warning("controller feed: thread did not stop within %.1f s", timeout_s)

    def stats(self) -> dict[str, Any]:
        """Counters for the heartbeat (JSON-able; see the class notes)."""
        with self._lock:
            return {"endpoint": self.endpoint, "alive": bool(self._thread and self._thread.is_alive()),
                    **self._counts, "malformed": dict(self._malformed)}

    # ------------------------------------------------------------------ thread
    def _run(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if not sock.poll(_POLL_MS, zmq.POLLIN):
                        continue
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ZMQError as exc:
                    if self._stop.is_set():
                        break
                    log.error("controller feed: receive failed (%s)", exc)
                    time.sleep(_POLL_MS / 1000)
                    continue
                self._count("received")
                try:
                    self._handle(frames)
                except _Malformed as m:
                    self._bad(m.key, m.reason)
                except Exception as exc:  # noqa: BLE001 - one message never kills the source
                    log.exception("controller feed: message not handled")
                    self._bad("internal", f"{type(exc).__name__}: {exc}")
        finally:
            sock.close(linger=0)
            log.info("controller feed: stopped (%s)", self.endpoint)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _bad(self, key: str, reason: str) -> None:
        with self._lock:
            self._malformed[key] = self._malformed.get(key, 0) + 1
        log.warning("controller feed %s: malformed message ignored (%s): %s", self.endpoint, key, reason)

    def _handle(self, frames: list[bytes]) -> None:
        """Check one multipart message and submit its Arrival (raises _Malformed)."""
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
            self._saved(header)
            return
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
        self._hand_on(Arrival(path=None, frame_id=fid, size=len(payload), received_at=now_utc(),
                              received_mono=time.monotonic(), source=self.name, kind=kind,
                              payload=payload, meta=header))

    def _saved(self, header: dict[str, Any]) -> None:
        raw = header.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise _Malformed("field:path", f"scan.saved: header field 'path' must be a non-empty text, got {raw!r}")
        path = Path(raw)
        received_at, mono = now_utc(), time.monotonic()
        try:
            if not path.is_file():
                raise FileNotFoundError(2, "no such file" if not path.exists() else "not a regular file")
            fid, size = sha256_file(path)
        except OSError as exc:
            reason = f"controller scan.saved: cannot read {raw} ({exc.strerror or exc})"
            log.warning("%s", reason)
            fid = hashlib.sha256(b"missing:" + raw.encode("utf-8", "surrogateescape")).hexdigest()
            self._hand_on(Arrival(path=path, frame_id=fid, size=0, received_at=received_at, received_mono=mono,
                                  error=reason, source=self.name, kind="file", meta=header))
            return
        self._hand_on(Arrival(path=path, frame_id=fid, size=size, received_at=received_at, received_mono=mono,
                              source=self.name, kind="file", meta=header))

    def _hand_on(self, item: Arrival) -> None:
        fid = item.frame_id
        try:
            seen = fid in self._recent or bool(self._known(fid))
        except Exception as exc:  # noqa: BLE001 - the store cannot say: process it (twice beats never)
            log.warning("controller feed: cannot check frame %s against the store (%s)", fid[:12], exc)
            seen = False
        if seen:
            self._count("duplicates")
            log.info("controller feed: %s skipped, same content (sha256 %s) already received", item.name, fid[:12])
            return
        try:
            self._submit(item)
        except Exception as exc:  # noqa: BLE001 - store full/locked: log, count, go on
            self._count("submit_errors")
            log.error("controller feed: %s (sha256 %s) could not be submitted: %s", item.name, fid[:12], exc)
            return
        self._recent[fid] = None
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        self._count("submitted")
        if item.error:
            self._count("errors")
