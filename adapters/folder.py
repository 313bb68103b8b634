"""Folder source: watch the acquisition folder and hand on each scan file once it is COMPLETE.

The Nanonis software (or a copy over a network share) writes a scan file in pieces; reading it
early gives a truncated frame. A file is therefore handed on only when complete:

* ``.sxm``: its size equals the size its header announces (:func:`adapters.sxm.expected_file_size`:
  header length + 4 bytes x pixels x frames). While the header itself is incomplete nothing is
  read. A file whose header is invalid, or that is larger than announced, can never become valid:
  it is handed on once its size has been stable for ``settle_s`` (the reader then rejects it with
  the reason).
* other files (the header cannot tell): the size and mtime have not changed for ``settle_s``.
* a file still incomplete ``complete_timeout_s`` after it was first seen is handed on as an error
  (``Arrival.error = "incomplete after N s ..."``) and the source moves on.

Files are opened safely (:mod:`adapters.files`): a path must resolve inside the acquisition roots
(``acquisition.folder`` and ``acquisition.roots``; a symlink leading out is refused), be a regular
file (a FIFO or device named ``x.sxm`` is refused at once, without blocking), and be at most
:data:`adapters.sxm.MAX_FILE_BYTES`. A refused file is handed on as an error Arrival (logged,
counted in ``stats()["refused"]``, recorded by the agent) and the source goes on.

Each complete file is read once (bounded) and hashed once; the bytes travel with the Arrival
(``Arrival.data``) so the agent's worker need not read the file again.

Identity is the sha256 of the file bytes: the same content is handed on once, whatever its name
(a copy under a new name is skipped), and content the store already knows (``known(frame_id)``) is
skipped, which makes the catch-up on start (files that arrived while the agent was down) cheap and
safe. Files are only read, never moved or deleted.

Threads: watchdog's observer (OS events, or :class:`watchdog.observers.polling.PollingObserver`
for network shares that send none) feeds paths into a set; one checker thread tests the pending
files every ``check_interval_s``, restarts the observer if its thread died, and puts
:class:`Arrival` items into :attr:`FolderSource.queue` for the daemon's worker.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from stm_agent.adapters.arrival import Arrival
from stm_agent.adapters.files import (Roots, hash_regular, open_regular, read_regular,  # noqa: F401 - sha256_file:
                                     sha256_file)  # its old home
from stm_agent.adapters.sxm import MAX_FILE_BYTES, expected_size, read_header_prefix
from stm_agent.agent.config import AcquisitionConfig
from stm_agent.agent.errors import ConfigError, RefusedPathError, ScanFormatError

__all__ = ["Arrival", "FolderSource", "sha256_file", "OUTPUT_MARK", "acquisition_roots"]

log = logging.getLogger(__name__)

#: Files up to this size are read whole (once) and their bytes handed to the worker with the
#: Arrival; larger ones are hashed in a stream and read again by the worker.
KEEP_BYTES = 256 << 20
OUTPUT_MARK = ".stm-agent."  # result files written next to scans carry this; never treated as scans


def acquisition_roots(cfg: AcquisitionConfig) -> Roots:
    """The folders scan files may be read from: ``cfg.folder`` and ``cfg.roots``."""
    return Roots([cfg.folder, *cfg.roots], "acquisition roots")


def refused_id(path: str | Path) -> str:
    """frame_id of a refused path (stable: a restart does not record it again)."""
    return hashlib.sha256(b"refused:" + os.fsencode(os.fspath(path))).hexdigest()


@dataclass
class _Pending:
    first_seen: float
    last_sig: tuple[int, int] | None = None
    last_change: float = 0.0
    catch_up: bool = False
    reported: bool = False  # "waiting for it to complete" logged once


class _Handler(FileSystemEventHandler):
    """Turns watchdog events (created, modified, closed, moved-in) into candidate paths."""

    def __init__(self, source: "FolderSource"):
        self.source = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("deleted", "closed_no_write", "opened"):
            return
        path = event.dest_path if kind == "moved" else event.src_path
        if not path:
            return
        path = os.fsdecode(path)
        if event.is_directory:
            if kind in ("created", "moved") and self.source.cfg.recursive:
                self.source._notice_tree(Path(path))
            return
        self.source._notice(Path(path))


class FolderSource:
    """Watches ``cfg.folder`` and puts :class:`Arrival` items for complete scan files into :attr:`queue`.

    Parameters
    ----------
    cfg : AcquisitionConfig
        folder, patterns (fnmatch, case-insensitive), recursive, polling, poll_interval_s, settle_s,
        complete_timeout_s, catch_up.
    known : callable(frame_id) -> bool
        True for frames already processed (the store's ``has``); they are skipped.
    out : queue.Queue, optional
        Queue to put arrivals into (default: a new unbounded queue, :attr:`queue`).
    check_interval_s : float
        How often pending files are checked, s.
    roots : Roots, optional
        Folders files must resolve into (default :func:`acquisition_roots` of ``cfg``).

    Raises
    ------
    ConfigError
        (from :meth:`start`) the folder does not exist and cannot be created, or is not a folder.
    """

    name = "folder"

    def __init__(self, cfg: AcquisitionConfig, known: Callable[[str], bool] = lambda fid: False,
                 out: queue.Queue | None = None, check_interval_s: float = 0.1, roots: Roots | None = None):
        self.cfg = cfg
        self.folder = Path(cfg.folder)
        self.roots = roots if roots is not None else acquisition_roots(cfg)
        self.refused = 0  # files refused (not regular, outside the roots, too large)
        self.known = known
        self.queue: queue.Queue[Arrival] = out if out is not None else queue.Queue()
        self.check_interval_s = float(check_interval_s)
        self.restarts = 0  # times the observer thread was found dead and restarted
        self._patterns = [p.lower() for p in cfg.patterns]
        self._lock = threading.Lock()
        self._noticed: set[Path] = set()
        self._pending: dict[Path, _Pending] = {}
        self._done: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) when handed on / skipped
        self._handed: set[str] = set()  # frame_ids handed on in this session
        self._stop = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Create the folder if needed, start the observer and the checker thread (catch-up first).

        Raises
        ------
        ConfigError
            The folder cannot be created or is not a folder.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"acquisition.folder: {self.folder}: cannot create it ({exc.strerror or exc})") from exc
        if not self.folder.is_dir():
            raise ConfigError(f"acquisition.folder: {self.folder}: not a folder")
        self._stop.clear()
        self._observer = self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="stm-agent-folder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the observer and the checker thread (idempotent). Pending files stay on disk."""
        self._stop.set()
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout_s)
            except RuntimeError:  # never started
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def observer_alive(self) -> bool:
        """True while the watchdog observer thread runs."""
        obs = self._observer
        return bool(obs is not None and obs.is_alive())

    def stats(self) -> dict:
        """Counters for the heartbeat: folder, files pending completion, observer state."""
        return {"folder": str(self.folder), "pending": len(self.pending()), "observer_alive": self.observer_alive,
                "observer_restarts": self.restarts, "refused": self.refused}

    def pending(self) -> list[Path]:
        """Files noticed but not yet handed on (incomplete, or not checked yet)."""
        with self._lock:
            return sorted(set(self._pending) | self._noticed)

    # ------------------------------------------------------------------ internals
    def _start_observer(self):
        obs = PollingObserver(timeout=self.cfg.poll_interval_s) if self.cfg.polling else Observer()
        obs.schedule(_Handler(self), str(self.folder), recursive=self.cfg.recursive)
        obs.daemon = True
        obs.start()
        return obs

    def _matches(self, path: Path) -> bool:
        name = path.name.lower()
        if OUTPUT_MARK in name:
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self._patterns)

    def _notice(self, path: Path) -> None:
        """A path was created / modified / moved in (called from the observer thread)."""
        if self._matches(path):
            with self._lock:
                self._noticed.add(path)

    def _notice_tree(self, folder: Path) -> None:
        for p in self._walk(folder):
            self._notice(p)

    def _walk(self, folder: Path) -> list[Path]:
        it = folder.rglob("*") if self.cfg.recursive else folder.glob("*")
        try:
            return [p for p in it if self._matches(p) and (p.is_symlink() or not p.is_dir())]
        except OSError as exc:
            log.warning("%s: cannot list the folder (%s)", folder, exc)
            return []

    @staticmethod
    def _sig(st: os.stat_result) -> tuple[int, int]:
        return st.st_size, st.st_mtime_ns

    def _catch_up(self) -> None:
        """Files already in the folder become pending; those whose content the store knows are
        skipped when they are read (:meth:`_hand_on`), so each is read and hashed once."""
        files = self._walk(self.folder)
        now = time.monotonic()
        with self._lock:
            for p in files:
                if self.cfg.catch_up:
                    self._pending.setdefault(p, _Pending(first_seen=now, catch_up=True))
                else:
                    try:
                        self._done[p] = self._sig(os.stat(p))
                    except OSError:
                        pass
        if self.cfg.catch_up:
            log.info("catch-up: %d file(s) in %s to check against the store", len(files), self.folder)

    def _loop(self) -> None:
        try:
            self._catch_up()
        except Exception:  # never let the catch-up kill the source
            log.exception("catch-up of %s failed", self.folder)
        while not self._stop.wait(self.check_interval_s):
            try:
                self._watch_observer()
                self._check()
            except Exception:  # keep watching whatever happens to one file
                log.exception("folder source: unexpected error while checking %s", self.folder)

    def _watch_observer(self) -> None:
        obs = self._observer
        if self._stop.is_set() or obs is None or obs.is_alive():
            return
        log.error("folder observer of %s died; restarting it (restart %d) and rescanning the folder",
                  self.folder, self.restarts + 1)
        try:
            obs.stop()
        except Exception:  # already dead
            pass
        self._observer = self._start_observer()
        self.restarts += 1
        self._notice_tree(self.folder)  # files that arrived while nobody watched

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            noticed, self._noticed = self._noticed, set()
            for p in noticed:
                if p not in self._pending:
                    self._pending[p] = _Pending(first_seen=now, last_change=now)
            items = list(self._pending.items())
        for path, st in items:
            verdict = self._verdict(path, st, now)
            if verdict is None:
                continue
            if verdict == "gone" or self._hand_on(path, st, error=None if verdict == "complete" else verdict):
                with self._lock:  # only now: pending() never misses a file between the two states
                    self._pending.pop(path, None)

    def _verdict(self, path: Path, st: _Pending, now: float) -> str | None:
        """None = keep waiting; "gone"; "complete"; "refused: <why>"; or an error reason (never completed).

        The file is opened safely (never blocks, never follows a symlink out of the roots) and
        its size and header are read from the open descriptor.
        """
        try:
            fd, s = open_regular(path, self.roots, MAX_FILE_BYTES)
        except FileNotFoundError:
            return "gone"
        except RefusedPathError as exc:
            try:
                if self._done.get(path) == self._sig(os.lstat(path)):
                    return "gone"  # refused already, unchanged
            except OSError:
                return "gone"
            return f"refused: {exc.reason}"
        try:
            sig = self._sig(s)
            if self._done.get(path) == sig:
                return "gone"  # unchanged since it was handed on or skipped
            if sig != st.last_sig:
                st.last_sig, st.last_change = sig, now
            stable = now - st.last_change >= self.cfg.settle_s
            size = sig[0]
            expected: int | None = None
            if path.suffix.lower() == ".sxm":
                try:
                    expected = expected_size(read_header_prefix(fd), name=str(path))
                except ScanFormatError:
                    if stable:  # cannot become valid: let the reader say why
                        return "complete"
                    expected = -1
                except OSError as exc:
                    log.warning("%s: cannot read its header (%s)", path, exc.strerror or exc)
                    return None
                if expected is not None and expected >= 0:
                    if size == expected or (size > expected and stable):
                        return "complete"
            elif stable:
                return "complete"
        finally:
            os.close(fd)
        waited = now - st.first_seen
        if stable and not st.reported:  # stopped growing short of its size: say so now, not at the timeout
            st.reported = True
            have = f"{size} of the {expected} bytes its header announces" if expected is not None and expected >= 0 \
                else f"{size} bytes, header not complete"
            log.warning("%s: incomplete (%s), unchanged for %.0f s; waiting up to %.0f s for the rest",
                        path, have, now - st.last_change, self.cfg.complete_timeout_s)
        if waited >= self.cfg.complete_timeout_s:
            if expected is None and path.suffix.lower() == ".sxm":
                what = f"header not complete ({size} bytes)"
            elif expected is not None and expected >= 0:
                what = f"{size} of the {expected} bytes its header announces"
            else:
                what = f"{size} bytes, still changing"
            return f"incomplete after {waited:.0f} s: {what}"
        return None

    def _hand_on(self, path: Path, st: _Pending, error: str | None) -> bool:
        """Read (once, safely, bounded), hash and queue the file, or skip it as a duplicate.
        False = keep it pending."""
        data: bytes | None = None
        if error is not None and error.startswith("refused: "):
            return self._refuse(path, st, error[len("refused: "):])
        try:
            if os.stat(path).st_size <= KEEP_BYTES:  # read once: these bytes go to the worker
                data, before = read_regular(path, self.roots, MAX_FILE_BYTES)
                fid, size = hashlib.sha256(data).hexdigest(), len(data)
            else:  # too big to hold for the worker: stream the hash
                fid, size, before = hash_regular(path, self.roots, MAX_FILE_BYTES)
            after = os.stat(path)  # as the descriptor's fstat: follows a symlink inside the roots
        except FileNotFoundError:
            return True
        except RefusedPathError as exc:
            return self._refuse(path, st, exc.reason)
        except OSError as exc:
            log.warning("%s: cannot read it (%s); will retry on its next change", path, exc)
            return True
        if error is None and self._sig(before) != self._sig(after):
            return False  # changed while reading: not complete after all
        if fid in self._handed or self.known(fid):
            self._done[path] = self._sig(after)
            (log.debug if st.catch_up else log.info)("%s: skipped, same content (sha256 %s) already processed",
                                                      path, fid[:12])
            return True
        item = Arrival(path=path, frame_id=fid, size=size, received_at=datetime.now(timezone.utc),
                       received_mono=time.monotonic(), error=error, catch_up=st.catch_up,
                       data=data if error is None else None)
        if error:
            log.warning("%s: %s", path, error)
        return self._queue(item, path, after)

    def _refuse(self, path: Path, st: _Pending, reason: str) -> bool:
        """Hand on a refused file as an error Arrival (logged, counted), once per change of it."""
        try:
            sig = self._sig(os.lstat(path))
        except FileNotFoundError:
            return True
        fid = refused_id(path)
        if fid in self._handed or self.known(fid):
            self._done[path] = sig
            return True
        self.refused += 1
        reason = f"refused: {reason}"
        log.error("%s: %s", path, reason)
        item = Arrival(path=path, frame_id=fid, size=0, received_at=datetime.now(timezone.utc),
                       received_mono=time.monotonic(), error=reason, catch_up=st.catch_up)
        return self._queue(item, path, os.lstat(path))

    def _queue(self, item: Arrival, path: Path, after: os.stat_result) -> bool:
        try:
            self.queue.put(item)
        except Exception as exc:  # noqa: BLE001 - the inbox is full/locked: keep the file pending, retry
            log.error("%s: cannot queue it (%s); will retry", path, exc)
            return False
        self._done[path] = self._sig(after)
        self._handed.add(item.frame_id)
        return True
