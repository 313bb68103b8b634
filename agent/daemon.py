"""The daemon: sources -> inbox (on disk) -> read scan -> recognise -> store -> result files, ZeroMQ.

One :class:`Agent` per microscope. Data flows one way:

1. **Sources** (each in its own thread) learn of new frames: the acquisition folder
   (:class:`adapters.folder.FolderSource`), the controller's ZeroMQ feed
   (:class:`adapters.controller.ControllerSource`), the Nanonis TCP interface
   (:class:`adapters.nanonis_tcp.NanonisSource`); several may run at once. Each calls
   :meth:`Agent.submit`, which writes received payloads into the spool folder and puts the frame
   into the store's ``inbox`` table. Work that arrives faster than it is processed therefore
   waits on disk, not in memory, and survives a crash; a frame already recorded or waiting (same
   sha256, from any source) is not taken again.
2. **The worker** (:meth:`Agent.run`) takes the oldest inbox frame, reads it, recognises it,
   writes the result files, then records the result and removes the frame from the inbox in one
   SQLite transaction (:meth:`adapters.store.ResultStore.record`), and only then publishes it and
   marks it published. Killed at any point (SIGKILL), a restarted agent finishes what was waiting
   and publishes again what was recorded but maybe not published: each frame is recorded exactly
   once, and subscribers get every frame at least once (``redelivered: true`` on the second
   time; de-duplicate by ``frame_id``). A frame that was being processed when the agent died
   ``MAX_ATTEMPTS`` times is recorded as an error instead of being tried forever.

A frame that cannot be read (any :class:`agent.errors.StmAgentError`) or that hits an unexpected
exception is logged, recorded with the reason, published with ``status: "error"``, and the agent
goes on. Scan files are never moved or deleted.

Published topics (multipart ``[topic, JSON]``, see :mod:`adapters.zmq_io` and the JSON Schemas in
``adapters/schemas``; every message has ``schema: 1``, ``agent_id`` and ``seq``, which increases
across restarts because it is reserved in blocks in the store):

* ``frame.counts``: ``frame_id`` (sha256 of the scan bytes), ``source`` (folder | controller |
  nanonis), ``path``, ``name``, ``acquired_at``, ``received_at``, ``processed_at``, ``scan``
  {pixels [nx, ny], range_nm, pixel_size_nm, bias_V, setpoint_A, direction, angle_deg},
  ``counts`` {species: n, incl. other}, ``n_objects``, ``encoder``, ``timings_ms`` (read +
  pipeline steps), ``latency_ms`` (frame received -> published), ``status`` ("ok" | "error"),
  ``reason``, ``files`` (result files written), ``catch_up``, ``redelivered``, ``config_digest``.
* ``frame.detections``: the frame header plus ``detections`` (``Detection.to_json()``); ok
  frames only.
* ``agent.status``: ``state`` "started" | "stopping", ``config_digest``, endpoints, sources,
  encoder, species.
* ``agent.heartbeat`` (every ``publish.heartbeat_s``): uptime, frames done, errors, queue depth
  (inbox), folder files pending completion, last frame, model, reference set, per-source stats.

A late joiner asks the query endpoint (``publish.query_endpoint``, REQ/REP): ``latest``,
``frame <frame_id>``, ``since <frame_seq>`` or ``status``.

``frame.counts`` carries ``frame_seq``: 1, 2, 3 ... in the order frames were recorded, stored
with each frame, without gaps. A PUB message can be lost (a kill -9 right after a non-blocking
send, a slow or late subscriber), so a subscriber that sees ``frame_seq`` jump (or the heartbeat's
``last_frame_seq`` ahead of what it has) asks ``since <last frame_seq it has>`` and gets every
later frame; ``stm-agent listen`` does.

One agent per store: the store's lock file is held while the agent exists (a second agent on the
same ``results.store`` is refused with a message naming the first one's pid).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stm_agent.adapters.arrival import Arrival, Source
from stm_agent.adapters.files import Roots
from stm_agent.adapters.ratelog import RateLimitedLog
from stm_agent.adapters.store import ResultStore
from stm_agent.adapters.zmq_io import Publisher
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.domain import FrameResult, Scan
from stm_agent.agent.errors import RefusedPathError, ScanFormatError, StmAgentError

__all__ = ["Agent", "install_signal_handlers", "MAX_ATTEMPTS"]

log = logging.getLogger(__name__)

#: A frame taken from the inbox this many times without being recorded (the agent died while
#: processing it each time) is recorded as an error rather than tried again.
MAX_ATTEMPTS = 3
_SEQ_BLOCK = 1000
#: After a restart with work left over, wait this long before publishing it: subscribers that were
#: connected before reconnect within ZeroMQ's reconnect interval (0.1 s) and would miss it otherwise.
REDELIVERY_GRACE_S = 1.0
#: how often the signal watcher looks for a received SIGINT/SIGTERM (s)
SIGNAL_POLL_S = 0.05
_RETRY_MAX_S = 5.0  # longest pause between two attempts to write the store (disk full ...)
_PAYLOAD_CACHE_BYTES = 64 << 20  # received payloads kept in memory for the worker (also on disk)
_SPOOL_PRUNE_EVERY_S = 5.0
_SCAN_KEYS = ("pixels", "range_nm", "pixel_size_nm", "bias_V", "setpoint_A", "direction", "angle_deg", "channel")
_FRAME_HEADER = ("frame_id", "source", "path", "name", "acquired_at", "received_at", "processed_at", "scan")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class _Inlet:
    """Queue-like front of :meth:`Agent.submit` for :class:`adapters.folder.FolderSource` (its ``out``)."""

    def __init__(self, submit):
        self.put = submit

    @staticmethod
    def qsize() -> int:
        return 0


class Agent:
    """The long-running agent beside one microscope.

    Parameters
    ----------
    cfg : AgentConfig
        The effective configuration (its :meth:`AgentConfig.digest` is logged, stored with every
        frame and published in ``agent.status``).
    recognizer : optional
        An object with ``recognise(scan) -> FrameResult``; default
        ``agent.pipeline.Recognizer.from_config(cfg, allow_empty=True)``.
    sources : list of Source, optional
        Replace the sources the config enables (tests). Each must call :meth:`submit`.

    Raises
    ------
    ReferenceLibraryError, ConfigError, ModelError
        The recogniser or a source cannot be built (unknown encoder, bad model folder ...).
    StoreError
        The results database cannot be opened.
    PublishError
        The PUB endpoint cannot be bound (port in use ...).

    Notes
    -----
    :meth:`run` is called once; it releases the sockets and the store when it returns.
    """

    def __init__(self, cfg: AgentConfig, recognizer: Any | None = None, sources: list[Source] | None = None):
        self.cfg = cfg
        self.config_digest = cfg.digest()
        self.store = ResultStore(cfg.results.store, lock=True)
        self.publisher: Publisher | None = None
        own_recognizer = recognizer is None
        self._rl = RateLimitedLog(log, 10.0)
        # payloads received over the feed, kept for the worker so it does not read back what was
        # just spooled (the spool file stays: it is the durable copy); bounded in bytes
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._payload_bytes = 0
        self._payload_lock = threading.Lock()
        self._spool_bytes: int | None = None
        self._spool_next_check = 0.0
        self._seq_lock = threading.Lock()
        self._seq_next, self._seq_high = 1, 0
        try:
            if recognizer is None:
                from stm_agent.agent.pipeline import Recognizer

                recognizer = Recognizer.from_config(cfg, allow_empty=True)
            self.recognizer = recognizer
            self.spool_dir = Path(cfg.results.spool_dir) if cfg.results.spool_dir is not None else (
                (self.store.path.parent if self.store.path is not None else Path(".")) / "spool")
            # Where scans may be read from, and where anything may be written (issue 15).
            acq = [cfg.acquisition.folder, *cfg.acquisition.roots]
            self.read_roots = Roots(acq, "acquisition roots")
            store_dir = self.store.path.parent if self.store.path is not None else None
            self.write_roots = Roots([store_dir, cfg.results.out_dir, self.spool_dir, cfg.references.folder, *acq],
                                     "write roots (store folder, results.out_dir, spool, references, acquisition roots)")
            self.sources: list[Source] = list(sources) if sources is not None else self._make_sources()
            p = cfg.publish
            self.publisher = Publisher(p.endpoint, sndhwm=p.sndhwm, linger_ms=p.linger_ms, agent_id=cfg.agent_id,
                                       seq=self._seq, curve_secret_file=p.curve_secret_file,
                                       curve_clients_dir=p.curve_clients_dir)
        except BaseException:
            self.store.close()
            raise
        self.query_server = None
        self.metrics = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ran = False
        self.frames_done = 0
        self.errors = 0
        self.refused_writes = 0  # result files not written: their folder is outside the write roots
        self.last_frame_id: str | None = None
        self.last_frame_name: str | None = None
        self.last_frame_at: str | None = None
        self.last_frame_seq = self.store.last_frame_seq()
        self._t_start = time.monotonic()
        from stm_agent.agent.hooks import AgentHooks

        #: triggers, display images, library reload, dashboard, Bluesky (agent/hooks.py)
        self.hooks = AgentHooks(self, own_recognizer)

    # ------------------------------------------------------------------ public
    @property
    def endpoint(self) -> str:
        """The bound PUB endpoint (port resolved when the config asked for ``*``)."""
        return self.publisher.endpoint if self.publisher else self.cfg.publish.endpoint

    @property
    def query_endpoint(self) -> str | None:
        """The bound query (REQ/REP) endpoint while running, else the configured one."""
        return self.query_server.endpoint if self.query_server is not None else self.cfg.publish.query_endpoint

    @property
    def source(self):
        """The folder source (None when ``acquisition.enabled`` is false)."""
        return next((s for s in self.sources if getattr(s, "name", "") == "folder"), None)

    def stop(self) -> None:
        """Ask :meth:`run` to finish the frame in progress and shut down (thread- and signal-safe)."""
        self._stop.set()
        self._wake.set()

    def submit(self, arrival: Arrival) -> bool:
        """Put a new frame into the on-disk inbox (called by the sources, from their threads).

        A payload (``scan.sxm`` / ``scan.array`` received over the feed) is first written into the
        spool folder as ``<frame_id>.sxm`` / ``<frame_id>.array`` (written to a temporary name,
        then renamed, so a crash never leaves half a file under the final name).

        Returns
        -------
        bool
            True if queued; False if this frame (same sha256, from any source) is already
            recorded or waiting.

        Raises
        ------
        StoreError
            The inbox cannot be written (disk full, store locked): the source keeps the frame
            and tries again (nothing received is dropped).
        OSError
            The spool folder cannot be written (disk full ...): same.
        """
        path = arrival.path
        new = False
        # a payload is checked against the store before it is spooled; the enqueue itself is atomic
        # (INSERT ... WHERE NOT EXISTS), so a file needs no separate check
        if arrival.payload is None or not self.store.has(arrival.frame_id):
            if arrival.payload is not None:
                path = self._spool(arrival)
            meta = dict(arrival.meta)
            meta.setdefault("name", arrival.name)
            new = self.store.enqueue(arrival.frame_id, source=arrival.source, kind=arrival.kind, path=path,
                                     meta=meta,
                                     received_at=arrival.received_at, error=arrival.error,
                                     catch_up=arrival.catch_up)
        if new:
            if arrival.payload is not None:
                self._keep_payload(arrival.frame_id, arrival.payload)
            elif arrival.data is not None and arrival.error is None:  # file bytes the source read (once)
                self._keep_payload(arrival.frame_id, arrival.data)
            self._wake.set()
        else:
            log.info("%s: skipped, frame %s already recorded or waiting", arrival.name, arrival.frame_id[:12])
        return new

    def run(self, stop: threading.Event | None = None) -> None:
        """Run the sources and process each frame until :meth:`stop` (or ``stop`` is set).

        On start, frames recorded but not published by an earlier run are published again
        (``redelivered: true``) and frames left in the inbox are processed first. On return the
        sources are stopped, ``agent.status`` "stopping" is published, the sockets and the store
        are closed. Frames still in the inbox are processed by the next start.

        Raises
        ------
        ConfigError
            A source cannot start (acquisition folder cannot be created ...).
        PublishError
            The query endpoint cannot be bound.
        RuntimeError
            ``run`` was already called on this agent.
        """
        if self._ran:
            raise RuntimeError("Agent.run() can be called once; make a new Agent")
        self._ran = True
        cfg = self.cfg
        self._t_start = time.monotonic()
        species = self._species()
        log.info("stm-agent %s starting: config digest %s; sources %s; publishing on %s; encoder %s on %s; "
                 "species %s", cfg.agent_id, self.config_digest, [s.name for s in self.sources] or "none",
                 self.endpoint, self._encoder_id(), self.provider() or "numpy (no onnxruntime session)", species)
        log.info("effective configuration (digest %s): %s", self.config_digest, cfg.model_dump_json())
        try:
            self._spool_bytes = self._spool_usage()
            self._start_services()
            for s in self.sources:
                s.start()
            self._publish("agent.status", {
                "state": "started", "config_digest": self.config_digest, "pid": os.getpid(),
                "endpoint": self.endpoint, "query_endpoint": self.query_endpoint,
                "sources": [s.name for s in self.sources],
                "encoder": self._encoder_id(), "species": species, "at": _now().isoformat(),
            })
            self._republish()
            hb = cfg.publish.heartbeat_s
            next_hb = time.monotonic()
            while not (self._stop.is_set() or (stop is not None and stop.is_set())):
                if hb > 0 and time.monotonic() >= next_hb:
                    self._heartbeat()
                    next_hb = time.monotonic() + hb
                self.hooks.poll()
                try:
                    done = self.process_next()
                except StmAgentError as exc:  # the store itself failed (disk full ...): wait, retry
                    self._rl.log(logging.ERROR, "next", "cannot take the next frame: %s", exc)
                    self._stop.wait(1.0)
                    continue
                if done is None:
                    self._wake.wait(0.1)
                    self._wake.clear()
        finally:
            self._shutdown()

    def process_next(self) -> dict[str, Any] | None:
        """Take the oldest frame of the inbox and process it; None when the inbox is empty.

        Returns
        -------
        dict | None
            The ``frame.counts`` message as published.

        Raises
        ------
        StoreError
            The store cannot be read or written.
        """
        row = self.store.claim()
        if row is None:
            return None
        try:
            return self._process(row)
        except StmAgentError:
            raise
        except Exception:  # noqa: BLE001 - one frame never kills the agent
            log.exception("%s: unexpected failure while handling the frame", row.get("path"))
            return None

    # ------------------------------------------------------------------ processing
    def _process(self, row: dict[str, Any]) -> dict[str, Any]:
        """Read, recognise, write files, record (inbox -> frames), publish one inbox row."""
        if row["error"]:
            return self._fail(row, row["error"])
        if row["attempts"] > MAX_ATTEMPTS:
            return self._fail(row, f"given up after {MAX_ATTEMPTS} attempts: the agent stopped while "
                                   "processing this frame each time")
        t0 = time.perf_counter()
        try:
            scan = self._read(row)
            t_read = (time.perf_counter() - t0) * 1000.0
            if scan.frame_id and scan.frame_id != row["frame_id"]:
                log.warning("%s: content changed after it was found complete (sha256 %s -> %s)",
                            row["path"], row["frame_id"][:12], scan.frame_id[:12])
            result: FrameResult = self.recognizer.recognise(scan)
        except StmAgentError as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            log.warning("%s: not processed: %s", self._name(row), reason)
            return self._fail(row, reason)
        except Exception as exc:  # noqa: BLE001
            log.exception("%s: unexpected error while processing the frame", self._name(row))
            return self._fail(row, f"internal error: {type(exc).__name__}: {exc}")
        result.frame_id = row["frame_id"]
        result.timings_ms = {"read": t_read, **result.timings_ms}
        files = self._write_files(result, row)
        self.hooks.before_publish(result)
        msg = {
            **self._header(row, result.scan, result.processed_at),
            "counts": dict(result.counts),
            "n_objects": result.n_objects,
            "encoder": result.encoder,
            "detection": result.detection,
            "threshold": result.encoder.get("threshold"),
            "timings_ms": {k: round(float(v), 3) for k, v in result.timings_ms.items()},
            "latency_ms": 0.0,
            "status": "ok",
            "reason": None,
            "files": [str(f) for f in files],
            "catch_up": row["catch_up"],
            "redelivered": False,
            "config_digest": self.config_digest,
        }
        msg["latency_ms"] = self._latency_ms(msg["received_at"])
        body = result.to_json()  # once, for the store and the frame.detections message
        self._store_write(row, lambda: self.store.record(
            result, row["path"], self.config_digest, received_at=_parse_time(msg["received_at"]), name=msg["name"],
            message=msg, source=row["source"], body=body))
        self._after_record(row)
        sent = self._publish_frame(msg, body["detections"])
        self.hooks.after_publish(msg, result)
        self.frames_done += 1
        self._frame_metrics("ok", msg["latency_ms"])
        log.info("%s: %s (%d objects, %.0f ms after arrival)", msg["name"],
                 ", ".join(f"{k}={v}" for k, v in result.counts.items()), result.n_objects, msg["latency_ms"])
        return sent

    def _read(self, row: dict[str, Any]) -> Scan:
        kind, path = row["kind"], row["path"]
        if kind == "file":
            from stm_agent.adapters.scanfile import read_scan

            data = self._take_payload(row["frame_id"])  # read, checked and hashed by the source
            if data is not None and str(path).lower().endswith(".sxm"):
                return read_scan(path, data=data, frame_id=row["frame_id"])
            return read_scan(path, roots=self.read_roots)
        payload = self._take_payload(row["frame_id"])  # received in this run: not read back from the spool
        if kind == "sxm":
            from stm_agent.adapters.sxm import read_sxm

            scan = read_sxm(payload if payload is not None else path, name=path,
                            frame_id=row["frame_id"] if payload is not None else None)
            scan.source = f"controller:{row['meta'].get('name') or row['frame_id'][:12]}"
            return scan
        from stm_agent.adapters.arrayscan import scan_from_array

        if payload is None:
            try:
                payload = Path(path).read_bytes()
            except OSError as exc:
                raise ScanFormatError(path, f"the spooled array is gone ({exc.strerror or exc})") from exc
        return scan_from_array(row["meta"], payload, source=f"controller:{self._name(row)}", frame_id=row["frame_id"])

    def _fail(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        """Record, write and publish an error result for an inbox row."""
        self.errors += 1
        now = _now()
        result = FrameResult(frame_id=row["frame_id"], source=row["source"], status="error", reason=reason,
                             processed_at=now)
        files = self._write_files(result, row)
        msg = {
            **self._header(row, None, now),
            "counts": {}, "n_objects": 0, "encoder": {}, "timings_ms": {}, "latency_ms": 0.0,
            "status": "error", "reason": reason, "files": [str(f) for f in files], "catch_up": row["catch_up"],
            "redelivered": False, "config_digest": self.config_digest,
        }
        msg["latency_ms"] = self._latency_ms(msg["received_at"])
        self._store_write(row, lambda: self.store.record_error(
            row["frame_id"], row["path"], reason, source=row["source"], config_digest=self.config_digest,
            received_at=_parse_time(row["received_at"]), name=msg["name"], message=msg))
        self._after_record(row)
        sent = self._publish_frame(msg, None)
        self._frame_metrics("error", msg["latency_ms"])
        return sent

    def _store_write(self, row: dict[str, Any], write) -> None:
        """Run ``write`` (record the result), retrying while the store cannot be written (disk
        full ...) with a growing pause, logged at most every 10 s. Work done is kept: the frame
        is not processed again. If the agent is asked to stop meanwhile, the frame stays in the
        inbox (its attempt is not counted against it) and StoreError is raised."""
        from stm_agent.agent.errors import StoreError

        pause = 0.1
        while True:
            try:
                write()
                self._rl.reset("record")
                return
            except StoreError as exc:
                if self._stop.is_set():
                    self.store.release_claim(row["id"])
                    raise
                self._rl.log(logging.ERROR, "record", "%s: cannot record the result (%s); retrying until the store "
                             "can be written (the frame stays in the inbox)", self._name(row), exc)
                self._stop.wait(pause)
                pause = min(pause * 2, _RETRY_MAX_S)

    def _after_record(self, row: dict[str, Any]) -> None:
        self._drop_payload(row["frame_id"])
        if row["kind"] != "file" and not self.cfg.results.keep_received:
            try:
                size = Path(row["path"]).stat().st_size
                Path(row["path"]).unlink(missing_ok=True)
                if self._spool_bytes is not None:
                    self._spool_bytes -= size
            except OSError as exc:
                log.warning("%s: cannot delete the spooled scan (%s)", row["path"], exc)
        if row["kind"] != "file":
            self._spool_budget()

    def _spool_budget(self) -> None:
        """Warn when the spool is over ``results.spool_budget_mb``; with ``spool_prune``, delete the
        oldest spooled scans whose result is recorded until it is under budget again."""
        rc = self.cfg.results
        if rc.spool_budget_mb is None:
            return
        if self._spool_bytes is None:
            self._spool_bytes = self._spool_usage()
        budget = int(rc.spool_budget_mb * (1 << 20))
        if self._spool_bytes <= budget:
            return
        if not rc.spool_prune:
            self._rl.log(logging.WARNING, "spool", "spool %s holds %.0f MB, over its budget of %.0f MB "
                         "(results.spool_budget_mb); nothing is deleted (results.spool_prune is false)",
                         self.spool_dir, self._spool_bytes / (1 << 20), rc.spool_budget_mb)
            return
        now = time.monotonic()
        if now < self._spool_next_check:
            return
        self._spool_next_check = now + _SPOOL_PRUNE_EVERY_S
        files = []
        for e in os.scandir(self.spool_dir):
            name, _, ext = e.name.partition(".")
            if ext in ("sxm", "array") and e.is_file(follow_symlinks=False):
                files.append((e.stat(follow_symlinks=False).st_mtime, e.path, name, e.stat(follow_symlinks=False).st_size))
        deleted = 0
        for _, path, fid, size in sorted(files):
            if self._spool_bytes <= budget:
                break
            rec = self.store.get(fid) if len(fid) == 64 else None
            if rec is None:  # still waiting in the inbox (or not ours): never deleted
                continue
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("%s: cannot delete the spooled scan (%s)", path, exc)
                continue
            self._spool_bytes -= size
            deleted += 1
        log.info("spool over budget: deleted %d recorded scan(s); %.0f MB left (budget %.0f MB)", deleted,
                 self._spool_bytes / (1 << 20), rc.spool_budget_mb)

    def _spool_state(self) -> dict[str, Any]:
        """The heartbeat's ``spool``: size, budget, whether it is over (``results.spool_budget_mb``)."""
        mb = (self._spool_bytes or 0) / (1 << 20)
        budget = self.cfg.results.spool_budget_mb
        return {"mb": round(mb, 1), "budget_mb": budget, "over_budget": budget is not None and mb > budget}

    def _spool_usage(self) -> int:
        try:
            return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(self.spool_dir)
                       if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return 0

    def _keep_payload(self, frame_id: str, payload: bytes) -> None:
        with self._payload_lock:
            if len(payload) > _PAYLOAD_CACHE_BYTES:
                return
            self._payloads[frame_id] = payload
            self._payload_bytes += len(payload)
            while self._payload_bytes > _PAYLOAD_CACHE_BYTES:
                _, old = self._payloads.popitem(last=False)
                self._payload_bytes -= len(old)

    def _take_payload(self, frame_id: str) -> bytes | None:
        with self._payload_lock:
            data = self._payloads.get(frame_id)
        return data

    def _drop_payload(self, frame_id: str) -> None:
        with self._payload_lock:
            data = self._payloads.pop(frame_id, None)
            if data is not None:
                self._payload_bytes -= len(data)

    def _publish_frame(self, msg: dict[str, Any], detections: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Publish frame.counts (and frame.detections for ok frames), then mark the frame published."""
        sent = self._publish("frame.counts", msg)
        if msg["status"] == "ok" and detections is not None:
            self._publish("frame.detections", {**{k: msg.get(k) for k in _FRAME_HEADER}, "status": "ok",
                                               "redelivered": msg["redelivered"], "detections": detections})
        try:
            self.store.mark_published(msg["frame_id"])
        except StmAgentError as exc:  # disk full: it is published again (redelivered) at the next start
            self._rl.log(logging.ERROR, "mark", "%s: published, but cannot note it in the store (%s)",
                         msg["frame_id"][:12], exc)
        self.last_frame_id = msg["frame_id"]
        if msg.get("frame_seq"):
            self.last_frame_seq = max(self.last_frame_seq, int(msg["frame_seq"]))
        self.last_frame_name = msg.get("name")
        self.last_frame_at = msg["processed_at"]
        return sent

    def _republish(self) -> None:
        """Publish again the frames recorded but not marked published (the agent died in between)."""
        rows = self.store.unpublished()
        if rows or self.store.pending_count():
            self._stop.wait(REDELIVERY_GRACE_S)
        for r in rows:
            msg = dict(r["message"] or {})
            if not msg:  # recorded by an older version without the message: rebuild the essentials
                msg = {"frame_id": r["frame_id"], "source": r["source"], "path": r["path"],
                       "name": r["name"] or Path(str(r["path"] or r["frame_id"])).name,
                       "acquired_at": None, "received_at": r["received_at"] or r["processed_at"],
                       "processed_at": r["processed_at"], "scan": None, "counts": r["counts"],
                       "n_objects": r["n_objects"], "encoder": r["encoder"], "timings_ms": r["timings"],
                       "latency_ms": 0.0, "status": r["status"], "reason": r["reason"], "files": [],
                       "catch_up": False, "config_digest": r["config_digest"] or self.config_digest}
            msg["frame_seq"] = r["frame_seq"]
            msg["redelivered"] = True
            self._publish_frame(msg, r["detections"] if r["status"] == "ok" else None)
        if rows:
            log.info("published again %d frame(s) recorded but maybe not published before the last stop", len(rows))

    # ------------------------------------------------------------------ helpers
    def _seq(self) -> int:
        """Next message sequence number, reserved in blocks in the store (increases across restarts)."""
        with self._seq_lock:
            if self._seq_next > self._seq_high:
                self._seq_next = self.store.reserve_seq(_SEQ_BLOCK)
                self._seq_high = self._seq_next + _SEQ_BLOCK - 1
            n = self._seq_next
            self._seq_next += 1
            return n

    def _spool(self, arrival: Arrival) -> Path:
        """Write the payload to ``<spool>/<frame_id>.sxm|array`` (0640, via a new temporary file,
        fsync, rename). A failed write (disk full) leaves no partial file and raises OSError."""
        self.spool_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        final = self.spool_dir / f"{arrival.frame_id}.{'sxm' if arrival.kind == 'sxm' else 'array'}"
        if not final.exists():
            tmp = final.with_suffix(final.suffix + f".{os.getpid()}.{threading.get_ident()}.part")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(arrival.payload or b"")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            if self._spool_bytes is not None:
                self._spool_bytes += len(arrival.payload or b"")
        return final

    @staticmethod
    def _name(row: dict[str, Any]) -> str:
        return str(row["meta"].get("name") or (Path(row["path"]).name if row["path"] else row["frame_id"][:12]))

    def _header(self, row: dict[str, Any], scan: dict[str, Any] | None, processed_at: datetime | None) -> dict[str, Any]:
        return {
            "frame_id": row["frame_id"],
            "source": row["source"],
            "path": row["path"] if row["kind"] == "file" else None,
            "name": self._name(row),
            "acquired_at": (scan or {}).get("acquired_at"),
            "received_at": row["received_at"] or _now().isoformat(),
            "processed_at": (processed_at or _now()).isoformat(),
            "scan": {k: scan.get(k) for k in _SCAN_KEYS} if scan else None,
        }

    @staticmethod
    def _latency_ms(received_at: str | None) -> float:
        t = _parse_time(received_at)
        return round(max((_now() - t).total_seconds(), 0.0) * 1000.0, 3) if t else 0.0

    def _write_files(self, result: FrameResult, row: dict[str, Any]) -> list[Path]:
        rc = self.cfg.results
        if not (rc.write_json or rc.write_overlay):
            return []
        path = Path(row["path"]) if row["path"] else self.spool_dir / row["frame_id"]
        out_dir = Path(rc.out_dir) if rc.out_dir is not None else path.parent
        stem = path.stem if row["kind"] == "file" else Path(self._name(row)).stem + "." + row["frame_id"][:12]
        from stm_agent.adapters.outputs import write_result_files

        # Only inside the write roots; next to a scan only inside the acquisition roots (a refused
        # path gets no file next to it); a configured out_dir may be created, nothing else.
        roots = self.read_roots if rc.out_dir is None and row["kind"] == "file" else self.write_roots
        try:
            return write_result_files(result, out_dir, stem, write_json=rc.write_json, write_overlay=rc.write_overlay,
                                      roots=roots, make_dirs=rc.out_dir is not None)
        except RefusedPathError as exc:
            self.refused_writes += 1
            log.error("%s: result files not written: %s", path, exc)
            return []
        except OSError as exc:  # results are in the store and on the socket anyway
            log.error("%s: cannot write the result files into %s (%s)", path, out_dir, exc.strerror or exc)
            return []

    def _publish(self, topic: str, message: dict[str, Any]) -> dict[str, Any]:
        if self.publisher is None:
            return message
        try:
            return self.publisher.publish(topic, message)
        except StmAgentError as exc:
            log.error("cannot publish %s: %s", topic, exc)
            return message

    def _species(self) -> list[str]:
        return list(getattr(getattr(self.recognizer, "refs", None), "species", []) or [])

    def _encoder_id(self) -> str | None:
        return getattr(getattr(self.recognizer, "encoder", None), "id", None)

    def provider(self) -> str | None:
        """The onnxruntime execution provider the CLIP session actually runs on (read from the
        session: ``CUDAExecutionProvider`` or ``CPUExecutionProvider``); None without an ONNX encoder."""
        rec = self.recognizer
        encoders = [getattr(rec, "encoder", None)] + [e for e, _ in (getattr(rec, "candidates", None) or {}).values()]
        return next((e.provider for e in encoders if getattr(e, "provider", None)), None)

    def _make_sources(self) -> list[Source]:
        cfg, out = self.cfg, []
        if cfg.acquisition.enabled:
            from stm_agent.adapters.folder import FolderSource

            out.append(FolderSource(cfg.acquisition, known=self.store.has, out=_Inlet(self.submit),
                                    roots=self.read_roots))
        if cfg.controller.enabled:
            from stm_agent.adapters.controller import ControllerSource

            out.append(ControllerSource(cfg.controller, self.submit, roots=self.read_roots))
        if cfg.nanonis.enabled:
            from stm_agent.adapters.nanonis_tcp import NanonisSource

            out.append(NanonisSource(cfg.nanonis, self.submit, self.store.has, roots=self.read_roots))
        if not out:
            log.warning("no source enabled (acquisition, controller, nanonis): the agent only processes what "
                        "is left in its inbox")
        return out

    def status(self) -> dict[str, Any]:
        """What the agent is doing now (the ``agent.heartbeat`` body; also the query's ``status``)."""
        folder = self.source
        pending = folder.pending() if folder is not None else []
        enc = self.recognizer.encoder if hasattr(self.recognizer, "encoder") else None
        sources = {}
        for s in self.sources:
            try:
                sources[s.name] = s.stats()
            except Exception as exc:  # noqa: BLE001 - a broken stats() must not stop the heartbeat
                sources[s.name] = {"error": str(exc)}
        return {
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "frames_done": self.frames_done,
            "errors": self.errors,
            "refused_writes": self.refused_writes,
            "queue_depth": self.store.pending_count(),
            "pending": len(pending),
            "pending_files": [p.name for p in pending[:20]],
            "last_frame_id": self.last_frame_id,
            "last_frame_name": self.last_frame_name,
            "last_frame_at": self.last_frame_at,
            "last_frame_seq": self.last_frame_seq,
            **({"spool": self._spool_state()} if self._spool_bytes is not None else {}),
            "model": {"encoder": self.cfg.encoder.name, "id": getattr(enc, "id", None), "provider": self.provider(),
                      "model_dir": str(self.cfg.encoder.model_dir) if self.cfg.encoder.model_dir else None},
            "reference_set": {"folder": str(self.cfg.references.folder), "species": self._species()},
            "sources": sources,
            "at": _now().isoformat(),
        }

    def _heartbeat(self) -> None:
        body = self.status()
        if self.metrics is not None:
            self.metrics.set_queue_depth(body["queue_depth"])
        self._publish("agent.heartbeat", body)

    def _frame_metrics(self, status: str, latency_ms: float) -> None:
        if self.metrics is not None:
            self.metrics.frame_done(status, latency_ms / 1000.0)

    def _query(self, command: str, arg: str | None) -> dict[str, Any] | None:
        """Answer the query endpoint: ``latest``, ``frame <id>``, ``since <frame_seq>``, ``status``."""
        if command == "status":
            return self.status()
        if command == "since":
            from stm_agent.adapters.query import since_body

            return since_body(self.store, int(arg or 0))
        if command == "latest":
            rows = self.store.latest(1)
            row = rows[0] if rows else None
        elif command == "frame" and arg:
            row = self.store.get(arg)
        else:
            return None
        if row is None:
            return None
        if not row["message"]:
            raise LookupError(f"frame {row['frame_id']} was recorded without its message (older agent)")
        msg = dict(row["message"])
        msg["frame_seq"] = row["frame_seq"]
        if row["status"] == "ok":
            msg["detections"] = row["detections"]
        return msg

    def _start_services(self) -> None:
        p = self.cfg.publish
        if p.query_endpoint:
            from stm_agent.adapters.query import QueryServer

            self.query_server = QueryServer(p.query_endpoint, self._query, agent_id=self.cfg.agent_id,
                                            curve_secret_file=p.curve_secret_file,
                                            curve_clients_dir=p.curve_clients_dir)
            self.query_server.start()
        if self.cfg.metrics.enabled:
            from stm_agent.adapters.prometheus import AgentMetrics

            m = self.cfg.metrics
            self.metrics = AgentMetrics(enabled=True, host=m.host, port=m.port)
            self.metrics.start()
        self.hooks.start()

    def _shutdown(self) -> None:
        log.info("stm-agent %s stopping (%d frames, %d errors)", self.cfg.agent_id, self.frames_done, self.errors)
        for s in self.sources:
            try:
                s.stop()
            except Exception:  # noqa: BLE001
                log.exception("cannot stop the %s source cleanly", getattr(s, "name", "?"))
        self._publish("agent.status", {"state": "stopping", "config_digest": self.config_digest,
                                       "frames_done": self.frames_done, "errors": self.errors,
                                       "at": _now().isoformat()})
        self.hooks.close()
        for svc in (self.query_server, self.metrics):
            if svc is not None:
                try:
                    svc.stop()
                except Exception:  # noqa: BLE001
                    log.exception("cannot stop %s cleanly", type(svc).__name__)
        if self.publisher is not None:
            self.publisher.close()
        self.store.close()


def install_signal_handlers(agent: Agent) -> dict[int, Any]:
    """Make SIGINT (Ctrl-C) and SIGTERM stop ``agent`` cleanly (call from the main thread).

    The first signal asks the agent to stop (sources stopped, last frame finished, ``agent.status``
    stopping published, sockets and store closed by :meth:`Agent.run`); the handler then restores
    the default so a second Ctrl-C interrupts at once.

    The handler itself only records the signal: :meth:`Agent.stop` is called by a small watcher
    thread. A handler runs in the main thread between two bytecodes, possibly while that thread is
    inside ``threading.Event.wait`` and holds the event's (non-reentrant) lock; ``Event.set`` from
    the handler would then wait for itself forever (seen as an agent that ignored SIGTERM).

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
    received: list[int] = []  # appended by the handler: no lock is taken there

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        received.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def watch() -> None:
        while not received:
            time.sleep(SIGNAL_POLL_S)
        log.info("received %s: stopping", signal.Signals(received[0]).name)
        agent.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    threading.Thread(target=watch, name="stm-agent-signals", daemon=True).start()
    return previous
