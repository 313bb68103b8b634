"""The daemon: folder source -> read scan -> recognise -> store, result files, ZeroMQ messages.

One :class:`Agent` per microscope. :meth:`Agent.run` is the worker loop: it takes complete files
from the :class:`adapters.folder.FolderSource` queue one at a time, so frames are processed in
arrival order and the recogniser is never used from two threads. Every frame ends as exactly one
row in the SQLite store (ok or error) and one ``frame.counts`` message; a frame that cannot be
read (any :class:`agent.errors.StmAgentError`) or that hits an unexpected exception is logged,
recorded with the reason, published with ``status: "error"``, and the agent goes on.

Published topics (multipart ``[topic, JSON]``, see :mod:`adapters.zmq_io`; every message has
``schema: 1``, ``agent_id``, ``seq``):

* ``frame.counts``: ``frame_id`` (sha256 of the file), ``source``, ``path``, ``acquired_at``,
  ``processed_at``, ``scan`` {pixels [nx, ny], range_nm, pixel_size_nm, bias_V, setpoint_A,
  direction, angle_deg}, ``counts`` {species: n, incl. other}, ``n_objects``, ``encoder``,
  ``timings_ms`` (read + pipeline steps), ``latency_ms`` (file found complete -> published),
  ``status`` ("ok" | "error"), ``reason`` (errors), ``files`` (result files written), ``catch_up``.
* ``frame.detections``: the same header plus ``detections`` (list of ``Detection.to_json()``);
  ok frames only.
* ``agent.status``: ``state`` "started" | "stopping", ``config_digest``, folder, endpoint,
  encoder, species.
* ``agent.heartbeat`` (every ``publish.heartbeat_s``): uptime_s, frames_done, errors,
  queue_depth, pending, last_frame_id, observer_alive, observer_restarts.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapters.folder import Arrival, FolderSource
from adapters.store import ResultStore
from adapters.zmq_io import Publisher
from agent.config import AgentConfig
from agent.domain import FrameResult
from agent.errors import StmAgentError

__all__ = ["Agent", "install_signal_handlers"]

log = logging.getLogger(__name__)

_SCAN_KEYS = ("pixels", "range_nm", "pixel_size_nm", "bias_V", "setpoint_A", "direction", "angle_deg")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Agent:
    """The long-running agent beside one microscope.

    Parameters
    ----------
    cfg : AgentConfig
        The effective configuration (its :meth:`AgentConfig.digest` is logged, stored with every
        frame and published in ``agent.status``).
    recognizer : optional
        An object with ``recognise(scan) -> FrameResult``; default
        ``agent.pipeline.Recognizer.from_config(cfg)`` (loads the reference library and encoder).

    Raises
    ------
    ReferenceLibraryError, ConfigError, ModelError
        The recogniser cannot be built (missing/empty library, unknown encoder ...).
    StoreError
        The results database cannot be opened.
    PublishError
        The PUB endpoint cannot be bound (port in use ...).

    Notes
    -----
    :meth:`run` is called once; it releases the socket and the store when it returns.
    """

    def __init__(self, cfg: AgentConfig, recognizer: Any | None = None):
        self.cfg = cfg
        self.config_digest = cfg.digest()
        self.store = ResultStore(cfg.results.store)
        self.publisher: Publisher | None = None
        try:
            if recognizer is None:
                from agent.pipeline import Recognizer

                recognizer = Recognizer.from_config(cfg, allow_empty=True)
            self.recognizer = recognizer
            p = cfg.publish
            self.publisher = Publisher(p.endpoint, sndhwm=p.sndhwm, linger_ms=p.linger_ms, agent_id=cfg.agent_id)
        except BaseException:
            self.store.close()
            raise
        self.source = FolderSource(cfg.acquisition, known=self.store.has)
        self._stop = threading.Event()
        self._ran = False
        self.frames_done = 0
        self.errors = 0
        self.last_frame_id: str | None = None
        self._t_start = time.monotonic()

    # ------------------------------------------------------------------ public
    @property
    def endpoint(self) -> str:
        """The bound PUB endpoint (port resolved when the config asked for ``*``)."""
        return self.publisher.endpoint if self.publisher else self.cfg.publish.endpoint

    def stop(self) -> None:
        """Ask :meth:`run` to finish the frame in progress and shut down (thread- and signal-safe)."""
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Watch the folder and process each complete scan until :meth:`stop` (or ``stop`` is set).

        On return the folder observer is stopped, ``agent.status`` "stopping" is published, the
        socket is closed (pending messages kept up to LINGER ms) and the store is closed. Files
        still waiting in the queue are processed by the catch-up of the next start.

        Raises
        ------
        ConfigError
            The acquisition folder cannot be created.
        RuntimeError
            ``run`` was already called on this agent.
        """
        if self._ran:
            raise RuntimeError("Agent.run() can be called once; make a new Agent")
        self._ran = True
        cfg = self.cfg
        self._t_start = time.monotonic()
        species = list(getattr(getattr(self.recognizer, "refs", None), "species", []) or [])
        encoder = getattr(getattr(self.recognizer, "encoder", None), "id", None)
        log.info("stm-agent %s starting: config digest %s; folder %s (%s); publishing on %s; encoder %s; "
                 "species %s", cfg.agent_id, self.config_digest, cfg.acquisition.folder,
                 "polling" if cfg.acquisition.polling else "OS events", self.endpoint, encoder, species)
        try:
            self.source.start()
            self._publish("agent.status", {
                "state": "started", "config_digest": self.config_digest, "pid": os.getpid(),
                "folder": str(cfg.acquisition.folder), "endpoint": self.endpoint,
                "encoder": encoder, "species": species, "at": _now().isoformat(),
            })
            hb = cfg.publish.heartbeat_s
            next_hb = time.monotonic()
            while not (self._stop.is_set() or (stop is not None and stop.is_set())):
                if hb > 0 and time.monotonic() >= next_hb:
                    self._heartbeat()
                    next_hb = time.monotonic() + hb
                try:
                    item = self.source.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                try:
                    self.process(item)
                except Exception:  # noqa: BLE001 - one frame never kills the agent
                    log.exception("%s: unexpected failure while handling the frame", item.path)
        finally:
            self._shutdown()

    def process(self, item: Arrival) -> dict[str, Any]:
        """Process one arrival: read, recognise, record, write result files, publish.

        Errors of the frame (unreadable scan, unexpected exception) are caught, logged, recorded
        and published with ``status: "error"``; the arrival's file is left untouched.

        Returns
        -------
        dict
            The ``frame.counts`` message as published.
        """
        if item.error is not None:
            return self._fail(item, item.error)
        t0 = time.perf_counter()
        try:
            from adapters.scanfile import read_scan

            scan = read_scan(item.path)
            t_read = (time.perf_counter() - t0) * 1000.0
            if scan.frame_id and scan.frame_id != item.frame_id:
                log.warning("%s: content changed after it was found complete (sha256 %s -> %s)",
                            item.path, item.frame_id[:12], scan.frame_id[:12])
            result: FrameResult = self.recognizer.recognise(scan)
        except StmAgentError as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            log.warning("%s: not processed: %s", item.path, reason)
            return self._fail(item, reason)
        except Exception as exc:  # noqa: BLE001
            log.exception("%s: unexpected error while processing the frame", item.path)
            return self._fail(item, f"internal error: {type(exc).__name__}: {exc}")
        result.frame_id = item.frame_id if not scan.frame_id else scan.frame_id
        result.timings_ms = {"read": t_read, **result.timings_ms}
        self.store.record(result, item.path, self.config_digest, received_at=item.received_at)
        files = self._write_files(result, item.path)
        header = self._header(result, item)
        counts_msg = self._publish("frame.counts", {
            **header,
            "counts": dict(result.counts),
            "n_objects": result.n_objects,
            "encoder": result.encoder,
            "timings_ms": {k: round(float(v), 3) for k, v in result.timings_ms.items()},
            "latency_ms": round((time.monotonic() - item.received_mono) * 1000.0, 3),
            "status": "ok",
            "reason": None,
            "files": [str(f) for f in files],
            "catch_up": item.catch_up,
        })
        self._publish("frame.detections", {**header, "status": "ok",
                                           "detections": [d.to_json() for d in result.detections]})
        self.frames_done += 1
        self.last_frame_id = result.frame_id
        log.info("%s: %s (%d objects, %.0f ms after arrival)", item.path.name,
                 ", ".join(f"{k}={v}" for k, v in result.counts.items()), result.n_objects,
                 counts_msg["latency_ms"])
        return counts_msg

    # ------------------------------------------------------------------ internals
    def _publish(self, topic: str, message: dict[str, Any]) -> dict[str, Any]:
        if self.publisher is None:
            return message
        try:
            return self.publisher.publish(topic, message)
        except StmAgentError as exc:
            log.error("cannot publish %s: %s", topic, exc)
            return message

    def _header(self, result: FrameResult, item: Arrival) -> dict[str, Any]:
        scan = result.scan or {}
        return {
            "frame_id": result.frame_id,
            "source": result.source,
            "path": str(item.path),
            "acquired_at": scan.get("acquired_at"),
            "processed_at": (result.processed_at or _now()).isoformat(),
            "scan": {k: scan.get(k) for k in _SCAN_KEYS} if scan else None,
        }

    def _fail(self, item: Arrival, reason: str) -> dict[str, Any]:
        """Record, write and publish an error result for ``item``."""
        self.errors += 1
        result = FrameResult(frame_id=item.frame_id, source=str(item.path), status="error", reason=reason,
                             processed_at=_now())
        try:
            self.store.record_error(item.frame_id, item.path, reason, source=str(item.path),
                                    config_digest=self.config_digest, received_at=item.received_at)
        except StmAgentError as exc:
            log.error("cannot record the error of %s: %s", item.path, exc)
        files = self._write_files(result, item.path)
        msg = self._publish("frame.counts", {
            **self._header(result, item),
            "counts": {}, "n_objects": 0, "encoder": {}, "timings_ms": {},
            "latency_ms": round((time.monotonic() - item.received_mono) * 1000.0, 3),
            "status": "error", "reason": reason, "files": [str(f) for f in files], "catch_up": item.catch_up,
        })
        self.last_frame_id = item.frame_id
        return msg

    def _write_files(self, result: FrameResult, path: Path) -> list[Path]:
        rc = self.cfg.results
        if not (rc.write_json or rc.write_overlay):
            return []
        out_dir = Path(rc.out_dir) if rc.out_dir is not None else Path(path).parent
        try:
            from adapters.outputs import write_result_files

            return write_result_files(result, out_dir, Path(path).stem, write_json=rc.write_json,
                                      write_overlay=rc.write_overlay)
        except Exception as exc:  # noqa: BLE001 - results are in the store and on the socket anyway
            log.error("%s: cannot write the result files into %s (%s)", path, out_dir, exc)
            return []

    def _heartbeat(self) -> None:
        self._publish("agent.heartbeat", {
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "frames_done": self.frames_done,
            "errors": self.errors,
            "queue_depth": self.source.queue.qsize(),
            "pending": len(self.source.pending()),
            "last_frame_id": self.last_frame_id,
            "observer_alive": self.source.observer_alive,
            "observer_restarts": self.source.restarts,
            "encoder": getattr(getattr(self.recognizer, "encoder", None), "id", None),
        })

    def _shutdown(self) -> None:
        log.info("stm-agent %s stopping (%d frames, %d errors)", self.cfg.agent_id, self.frames_done, self.errors)
        try:
            self.source.stop()
        except Exception:  # noqa: BLE001
            log.exception("cannot stop the folder source cleanly")
        self._publish("agent.status", {"state": "stopping", "config_digest": self.config_digest,
                                       "frames_done": self.frames_done, "errors": self.errors,
                                       "at": _now().isoformat()})
        if self.publisher is not None:
            self.publisher.close()
        self.store.close()


def install_signal_handlers(agent: Agent) -> dict[int, Any]:
    """Make SIGINT (Ctrl-C) and SIGTERM stop ``agent`` cleanly (call from the main thread).

    The first signal asks the agent to stop (observer stopped, last frame finished, ``agent.status``
    stopping published, socket and store closed by :meth:`Agent.run`); the handler then restores
    the default so a second Ctrl-C interrupts at once.

    Returns
    -------
    dict
        The previous handlers, by signal number.

    Raises
    ------
    ValueError
        Not called from the main thread (Python only allows handlers there).
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        log.info("received %s: stopping", signal.Signals(signum).name)
        agent.stop()
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous
