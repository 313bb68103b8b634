"""Reprocess archives of scans: the daemon's results for every scan of some folders, in parallel.

Data flow (one writer)::

    client: find scans -> read bytes, sha256 -> skip if recorded -> submit
    workers (processes, or Dask workers): read scan from the bytes -> Recognizer.recognise ->
        render the overlay PNG -> return (result, PNG bytes)
    client: write JSON + PNG under --out -> record the frame in the store (one transaction)

* **Same results as the daemon**: the same :class:`agent.pipeline.Recognizer` and configuration,
  the same ``frame_id`` (sha256 of the scan bytes), ``counts`` and ``detections``, the same store
  schema (:class:`adapters.store.ResultStore`) and result files (``<stem>.stm-agent.json`` /
  ``.png``). Source is ``batch``; times and ``seq`` differ (batch publishes nothing).
* **Exactly once per scan**: the store's ``frames`` table is keyed by sha256; a scan already
  recorded (by an earlier, maybe interrupted, batch into the same ``--out``) is skipped, and a
  file whose bytes equal another's in the same run is processed once.
* **Resumable**: results are recorded as they arrive; an interrupted batch (Ctrl-C, SIGKILL,
  power cut) loses only the scans in flight, which the next run does.
* **One writer**: only the client touches the store and ``--out``; the workers return results.
  An exclusive lock file (``--out/.batch.lock``, ``flock``) refuses a second batch on the same
  ``--out``. Nothing is ever written next to the archive scans.
* **Dask**: with ``dask_address`` the scans run on an existing ``dask.distributed`` cluster. The
  scan bytes travel to the workers (they need no access to the archive); the workers need the
  reference library (and the CLIP model folder, if used) at the same path as the client.

``encoder.select: once`` fixes the encoder on the first frame a process sees; in parallel each
worker fixes its own, so results can differ from the daemon's in that mode (per_frame, the
default, is identical).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from stm_agent.agent.config import AgentConfig
from stm_agent.agent.domain import FrameResult

__all__ = ["BatchReport", "ScanJob", "find_scans", "process_scan", "run_batch", "BatchError"]

log = logging.getLogger(__name__)

SOURCE = "batch"
STORE_NAME = "results.sqlite"
FILES_DIR = "frames"
LOCK_NAME = ".batch.lock"
_SCAN_KEYS = ("pixels", "range_nm", "pixel_size_nm", "bias_V", "setpoint_A", "direction", "angle_deg")


class BatchError(Exception):
    """A batch cannot start (no scan found, ``--out`` in use by another batch or inside an archive,
    Dask scheduler unreachable ...). The message is one line for people."""


@dataclass(frozen=True)
class ScanJob:
    """One scan file to process.

    Attributes
    ----------
    path : Path
        The archive file (read only).
    out_dir : Path
        Where its result files go (under ``--out``; mirrors the archive's sub-folders).
    """

    path: Path
    out_dir: Path


@dataclass
class BatchReport:
    """What a batch did.

    Attributes
    ----------
    found : int
        Scan files found.
    processed : int
        Scans recognised and recorded in this run (ok or error).
    errors : int
        Of ``processed``, scans recorded with status error (unreadable, empty ...).
    already : int
        Scans skipped because the store had them already (earlier run).
    duplicates : int
        Files skipped because another file of this run has the same bytes (sha256).
    seconds : float
        Wall time of the processing (after the scan search).
    counts : Counter
        Species counts summed over the scans processed in this run.
    interrupted : bool
        The run was stopped before every scan was done.
    """

    found: int = 0
    processed: int = 0
    errors: int = 0
    already: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)
    interrupted: bool = False

    @property
    def frames_per_s(self) -> float:
        """Scans processed per second of wall time (0 when none)."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def find_scans(inputs: Iterable[str | Path], out: Path, suffixes: tuple[str, ...] = (".sxm",)) -> list[ScanJob]:
    """The scan files under ``inputs`` (folders searched recursively, files taken as they are).

    Parameters
    ----------
    inputs : iterable of str | Path
        Folders and/or files.
    out : Path
        The batch's output folder: ``out/frames/<folder name>/<sub-folders>/`` receives the
        results of each scan; scans inside ``out`` itself are ignored.
    suffixes : tuple of str
        File suffixes taken from folders (lower case; a file named explicitly is always taken).

    Returns
    -------
    list[ScanJob]
        Sorted by path within each input; a file reached twice is listed once.

    Raises
    ------
    BatchError
        An input does not exist.
    """
    out_r = Path(out).resolve()
    jobs: list[ScanJob] = []
    seen: set[Path] = set()
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise BatchError(f"{p}: no such file or folder")
        if p.is_file():
            files = [(p, out_r / FILES_DIR)]
        else:
            base = out_r / FILES_DIR / (p.resolve().name or "root")
            files = [(f, base / f.parent.relative_to(p)) for f in sorted(p.rglob("*"))
                     if f.is_file() and f.suffix.lower() in suffixes]
        for f, dest in files:
            r = f.resolve()
            if r in seen or out_r in r.parents:
                continue
            seen.add(r)
            jobs.append(ScanJob(f, dest))
    return jobs


# ---------------------------------------------------------------------------- worker side
_RECOGNIZERS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _recognizer(cfg_json: str):
    """One Recognizer per configuration per process (the reference embeddings are cached)."""
    with _LOCK:
        rec = _RECOGNIZERS.get(cfg_json)
        if rec is None:
            from stm_agent.agent.pipeline import Recognizer

            rec = Recognizer.from_config(AgentConfig.model_validate_json(cfg_json), allow_empty=True)
            _RECOGNIZERS[cfg_json] = rec
        return rec


def process_scan(name: str, data: bytes | None, path: str, cfg_json: str,
                 pixel_size_nm: float | None = None, overlay: bool = True) -> dict[str, Any]:
    """Recognise one scan (runs in a worker process or on a Dask worker; touches no file but the input).

    Parameters
    ----------
    name : str
        File name, for messages.
    data : bytes | None
        The .sxm bytes (read by the client); None to read ``path`` (images).
    path : str
        The archive path (read only when ``data`` is None).
    cfg_json : str
        ``AgentConfig.model_dump_json()`` of the batch.
    pixel_size_nm : float | None
        Pixel size of images (nm).
    overlay : bool
        Render the annotated PNG.

    Returns
    -------
    dict
        ``{"result": FrameResult (image dropped), "png": bytes | None, "read_ms": float}``; a scan
        that cannot be read or recognised gives a FrameResult with ``status="error"`` and the
        reason (never raises for a bad scan).
    """
    import cv2

    from stm_agent.agent.errors import StmAgentError

    t0 = time.perf_counter()
    frame_id = ""
    try:
        rec = _recognizer(cfg_json)
        if data is not None:
            from stm_agent.adapters.sxm import read_sxm

            scan = read_sxm(data, name=path)  # hashes the bytes: scan.frame_id
        else:
            from stm_agent.adapters.scanfile import read_scan

            scan = read_scan(path, pixel_size_nm=pixel_size_nm)
        frame_id = scan.frame_id
        read_ms = (time.perf_counter() - t0) * 1000.0
        result: FrameResult = rec.recognise(scan)
    except StmAgentError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return {"result": FrameResult(frame_id=frame_id, source=SOURCE, status="error", reason=reason,
                                      processed_at=datetime.now(timezone.utc)), "png": None, "read_ms": 0.0}
    except Exception as exc:  # noqa: BLE001 - one scan never stops the batch
        log.exception("%s: unexpected error", name)
        return {"result": FrameResult(frame_id=frame_id, source=SOURCE, status="error",
                                      reason=f"internal error: {type(exc).__name__}: {exc}",
                                      processed_at=datetime.now(timezone.utc)), "png": None, "read_ms": 0.0}
    result.frame_id = frame_id
    result.timings_ms = {"read": read_ms, **result.timings_ms}
    png = None
    if overlay and result.image is not None:
        from stm_agent.adapters.outputs import render_overlay

        px = tuple(result.scan.get("pixel_size_nm") or (1.0, 1.0))
        ok, buf = cv2.imencode(".png", render_overlay(result, result.image, (float(px[0]), float(px[1]))))
        png = buf.tobytes() if ok else None
    result.image = None  # not sent back: the PNG is
    return {"result": result, "png": png, "read_ms": read_ms}


# ---------------------------------------------------------------------------- client side
class _OutLock:
    """Exclusive ``flock`` on ``out/.batch.lock``: one batch (one store writer) per ``--out``."""

    def __init__(self, out: Path):
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self._f = open(out / LOCK_NAME, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise BatchError(f"{out}: another batch is writing into this folder (a store has one writer)") from None
        self._f.truncate(0)
        self._f.write(f"{os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        import fcntl

        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()


class _Executor:
    """submit(fn, *args) -> concurrent Future, on local processes, in this process, or on Dask."""

    def __init__(self, workers: int, dask_address: str | None):
        self.client = None
        self.pool = None
        self.workers = workers
        if dask_address:
            try:
                from distributed import Client
            except ImportError:
                raise BatchError("--dask needs dask.distributed: pip install 'stm-agent[batch]'") from None
            try:
                self.client = Client(dask_address, timeout="10s", set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise BatchError(f"cannot reach the Dask scheduler at {dask_address} ({exc})") from None
            self.workers = max(1, sum(w.get("nthreads", 1) for w in self.client.scheduler_info()["workers"].values()))
        elif workers > 0:
            import multiprocessing as mp

            # spawn: workers start clean (no inherited threads, sockets or ONNX sessions)
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))

    @property
    def window(self) -> int:
        """Scans in flight at most (bounds the scan bytes held in memory)."""
        return max(2, 2 * self.workers)

    def submit(self, fn: Callable, *args) -> Future:
        if self.client is not None:
            return self._bridge(self.client.submit(fn, *args, pure=False))
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001
            f.set_exception(exc)
        return f

    @staticmethod
    def _bridge(dfut) -> Future:
        """A concurrent.futures Future completed by a Dask future (the result comes back to the client)."""
        f: Future = Future()

        def done(d) -> None:
            try:
                f.set_result(d.result())
            except BaseException as exc:  # noqa: BLE001
                f.set_exception(exc)

        dfut.add_done_callback(done)
        f._dask = dfut  # keep the Dask future alive until the result is taken
        return f

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if self.client is not None:
            self.client.close()


def _message(result: FrameResult, job: ScanJob, files: list[Path], received_at: str, digest: str) -> dict[str, Any]:
    """The ``frame.counts`` message the daemon would have published for this frame (kept in the store)."""
    scan = result.scan or {}
    return {
        "frame_id": result.frame_id, "source": SOURCE, "path": str(job.path), "name": job.path.name,
        "acquired_at": scan.get("acquired_at"), "received_at": received_at,
        "processed_at": (result.processed_at or datetime.now(timezone.utc)).isoformat(),
        "scan": {k: scan.get(k) for k in _SCAN_KEYS} if result.status == "ok" else None,
        "counts": dict(result.counts), "n_objects": result.n_objects, "encoder": result.encoder,
        "timings_ms": {k: round(float(v), 3) for k, v in result.timings_ms.items()}, "latency_ms": 0.0,
        "status": result.status, "reason": result.reason, "files": [str(f) for f in files],
        "catch_up": False, "redelivered": False, "config_digest": digest,
    }


def _write(job: ScanJob, out: dict[str, Any], cfg: AgentConfig) -> list[Path]:
    """Result files of one scan under ``job.out_dir`` (JSON, then the overlay PNG); atomic renames."""
    from stm_agent.adapters.outputs import write_result_files

    rc = cfg.results
    result: FrameResult = out["result"]
    files = write_result_files(result, job.out_dir, job.path.stem, write_json=rc.write_json, write_overlay=False)
    if rc.write_overlay and out["png"] is not None:
        p = job.out_dir / f"{job.path.stem}.stm-agent.png"
        tmp = p.with_suffix(".png.tmp")
        tmp.write_bytes(out["png"])
        tmp.replace(p)
        files.append(p)
    return files


def _read(job: ScanJob) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a readable .sxm, (None, None) for images (read by the worker), (None, why)."""
    if job.path.suffix.lower() != ".sxm":
        return None, None
    try:
        return job.path.read_bytes(), None
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror or exc})"


def run_batch(
    inputs: Iterable[str | Path],
    out: str | Path,
    cfg: AgentConfig,
    *,
    workers: int | None = None,
    dask_address: str | None = None,
    pixel_size_nm: float | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> BatchReport:
    """Recognise every scan under ``inputs`` once; record results in ``out/results.sqlite`` and
    write ``<stem>.stm-agent.json``/``.png`` under ``out/frames/``.

    Parameters
    ----------
    inputs : iterable of str | Path
        Archive folders (searched recursively for ``.sxm``; with ``pixel_size_nm`` also images)
        and/or files. Never written to.
    out : str | Path
        Output folder (created): the store, the result files, the lock file.
    cfg : AgentConfig
        The configuration (references, encoder, segmentation ...); ``results.store`` and
        ``results.out_dir`` are ignored (everything goes under ``out``).
    workers : int | None
        Local worker processes; None = ``os.cpu_count()``; 0 = in this process (serial, as the
        daemon). Ignored with ``dask_address``.
    dask_address : str | None
        ``tcp://scheduler:8786`` of a running ``dask.distributed`` cluster.
    pixel_size_nm : float | None
        Pixel size of image files (nm); without it only ``.sxm`` files are taken.
    stop : threading.Event | None
        Set it to stop early: no new scan is submitted, scans in flight are finished and recorded.
    on_progress : callable(name, done, total) | None
        Called after each scan is recorded or skipped (``done`` counts both).

    Returns
    -------
    BatchReport

    Raises
    ------
    BatchError
        No scan found, ``out`` locked by another batch, Dask unreachable or not installed.
    StoreError
        The store cannot be opened or written.
    """
    from stm_agent.adapters.images import IMAGE_SUFFIXES
    from stm_agent.adapters.store import ResultStore

    out = Path(out)
    suffixes = (".sxm",) + (IMAGE_SUFFIXES if pixel_size_nm is not None else ())
    jobs = find_scans(inputs, out, suffixes)
    if not jobs:
        raise BatchError(f"no scan ({', '.join(suffixes)}) found in {', '.join(map(str, inputs))}")
    lock = _OutLock(out)
    report = BatchReport(found=len(jobs))
    cfg_json = cfg.model_dump_json()
    digest = cfg.digest()
    store = ResultStore(out / STORE_NAME)
    ex = None
    try:
        ex = _Executor(os.cpu_count() or 1 if workers is None else workers, dask_address)
        t0 = time.perf_counter()
        taken: set[str] = set()
        inflight: dict[Future, tuple[ScanJob, str, str]] = {}
        done = 0
        queue: Iterator[ScanJob] = iter(jobs)

        def tick(name: str) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(name, done, len(jobs))

        def finish(fut: Future) -> None:
            job, received, fid = inflight.pop(fut)
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
                raise BatchError(f"{job.path}: the worker failed ({type(exc).__name__}: {exc}); "
                                 "run the batch again to resume") from exc
            result: FrameResult = res["result"]
            if result.frame_id != fid:  # errors before the scan was parsed; a file changed meanwhile
                if result.frame_id:
                    log.warning("%s: content changed while the batch ran (sha256 %s -> %s)", job.path, fid[:12],
                                result.frame_id[:12])
                result.frame_id = fid
            try:
                files = _write(job, res, cfg)
            except OSError as exc:
                log.error("%s: cannot write the result files into %s (%s)", job.path, job.out_dir, exc)
                files = []
            msg = _message(result, job, files, received, digest)
            if result.status == "ok":
                store.record(result, job.path, digest, received_at=datetime.fromisoformat(received),
                             name=job.path.name, message=msg, source=SOURCE)
                report.counts.update(result.counts)
            else:
                store.record_error(result.frame_id, job.path, result.reason or "error", source=SOURCE,
                                   config_digest=digest, received_at=datetime.fromisoformat(received),
                                   name=job.path.name, message=msg)
                report.errors += 1
            store.mark_published(result.frame_id)  # batch publishes nothing: never re-published
            report.processed += 1
            tick(job.path.name)

        exhausted = False
        while True:
            while not exhausted and len(inflight) < ex.window and not (stop is not None and stop.is_set()):
                job = next(queue, None)
                if job is None:
                    exhausted = True
                    break
                data, why = _read(job)
                fid = hashlib.sha256(data).hexdigest() if data is not None else None
                if fid is None and why is None:  # an image: identity from its bytes too
                    try:
                        fid = hashlib.sha256(job.path.read_bytes()).hexdigest()
                    except OSError as exc:
                        why = f"cannot read the file ({exc.strerror or exc})"
                received = datetime.now(timezone.utc).isoformat()
                if why is not None:
                    fid = hashlib.sha256(str(job.path.resolve()).encode()).hexdigest()
                if fid in taken:
                    report.duplicates += 1
                    tick(job.path.name)
                    continue
                taken.add(fid)
                if store.has(fid):
                    report.already += 1
                    tick(job.path.name)
                    continue
                if why is not None:
                    f: Future = Future()
                    f.set_result({"result": FrameResult(frame_id=fid, source=SOURCE, status="error", reason=why,
                                                        processed_at=datetime.now(timezone.utc)), "png": None})
                else:
                    f = ex.submit(process_scan, job.path.name, data, str(job.path), cfg_json, pixel_size_nm,
                                  cfg.results.write_overlay)
                inflight[f] = (job, received, fid)
            if not inflight:
                break
            finished, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                finish(fut)
        report.interrupted = done < len(jobs)
        report.seconds = time.perf_counter() - t0
    except KeyboardInterrupt:
        report.interrupted = True
        if ex is not None:
            ex.close(cancel=True)
            ex = None
        raise
    finally:
        if ex is not None:
            ex.close()
        store.close()
        lock.release()
    return report
