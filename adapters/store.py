"""SQLite record of every frame the agent has seen (ok or error), keyed by the sha256 of the scan,
and the on-disk queue of frames waiting to be processed.

The store is what makes the agent exactly-once: a frame whose ``frame_id`` (sha256 of the scan
bytes) is already recorded, or already waiting, is never taken again, whatever its file name or
source, and a restarted agent knows what it has done. Sources put arrivals into the ``inbox``
table; the worker takes the oldest, and :meth:`ResultStore.complete` inserts the ``frames`` row
and deletes the inbox row in ONE transaction, so a kill at any point leaves each frame either
waiting (processed again on restart) or recorded (never again). Publication is tracked by
``published_at``: a frame recorded but not yet published when the agent died is published again
on restart (at-least-once delivery; consumers de-duplicate by ``frame_id``).

Write-ahead logging (WAL) lets other processes read the file while the agent writes. The store
never touches the scan files themselves (unreadable files are recorded, never deleted or moved).

Schema (table ``frames``)::

    frame_id TEXT PRIMARY KEY  -- sha256 hex of the file bytes
    source TEXT                -- where the frame came from (file path or zmq:<topic>)
    path TEXT                  -- file path when it was processed
    received_at TEXT           -- ISO 8601 UTC: when the complete file was noticed
    processed_at TEXT          -- ISO 8601 UTC: when the result was recorded
    status TEXT                -- 'ok' | 'error'
    reason TEXT                -- why, for errors (NULL for ok)
    counts TEXT                -- JSON {species: n}
    n_objects INTEGER          -- counted objects (not touching the edge)
    detections TEXT            -- JSON list of Detection.to_json()
    encoder TEXT               -- JSON {name, id, ...}
    timings TEXT               -- JSON {step: ms}
    config_digest TEXT         -- AgentConfig.digest() of the effective configuration
    scan TEXT                  -- JSON Scan.summary() (pixels, range_nm, bias_V, ...)
    name TEXT                  -- short name (file name, or the feed's name)
    message TEXT               -- JSON frame.counts message as published (without seq)
    published_at TEXT          -- ISO 8601 UTC when published; NULL = not yet (re-published on start)
    frame_seq INTEGER UNIQUE   -- 1, 2, 3 ... in the order frames were recorded, without gaps

Table ``inbox`` (frames waiting; oldest first by ``id``)::

    id INTEGER PRIMARY KEY AUTOINCREMENT, frame_id TEXT UNIQUE, source TEXT, kind TEXT
    ('file' | 'sxm' | 'array'), path TEXT (the file, or the spooled payload), meta TEXT (JSON),
    received_at TEXT, error TEXT, catch_up INTEGER, attempts INTEGER (times a worker took it)

Table ``trigger_firings`` (one row per firing of a trigger rule, :mod:`agent.triggers`)::

    id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT, frame_id TEXT, fired_at TEXT (ISO 8601 UTC),
    observed REAL (the metric), event TEXT (JSON trigger.fired body), results TEXT (JSON list, one
    entry per action: null until it has run, then its result: exit status, what was sent ...)

Table ``meta`` (key TEXT PRIMARY KEY, value TEXT): ``seq_reserved``, the highest message sequence
number reserved by a publisher (see :meth:`ResultStore.reserve_seq`).

One agent per store: an agent opens the store with ``lock=True``, which holds an exclusive
``flock`` on ``<store>.lock`` (a local lock file, released by the kernel when the process dies,
even by kill -9); a second agent on the same store is refused with a :class:`StoreError` naming
the first one's pid. Readers (``results export``, ``status``, tests) open it without the lock.
Locks on network shares (NFS, SMB) are not reliable: keep the store on a local disk.
``frame_seq`` is assigned and ``seq`` blocks are reserved inside ``BEGIN IMMEDIATE`` transactions,
so they are atomic across processes as well. The store file, its lock and the spool are created
0640 (owner read-write, group read).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stm_agent.agent.domain import FrameResult
from stm_agent.agent.errors import StoreError
from stm_agent.agent.jsonsafe import jsonable

__all__ = ["ResultStore", "StoreLock", "SCHEMA_VERSION", "SINCE_LIMIT"]

SCHEMA_VERSION = 3
#: Most frames one :meth:`ResultStore.since` call returns (a reply stays small; ask again for more).
SINCE_LIMIT = 100
_FILE_MODE = 0o640

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    frame_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    path TEXT,
    received_at TEXT,
    processed_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    reason TEXT,
    counts TEXT NOT NULL DEFAULT '{}',
    n_objects INTEGER NOT NULL DEFAULT 0,
    detections TEXT NOT NULL DEFAULT '[]',
    encoder TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    config_digest TEXT,
    scan TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS frames_processed_at ON frames (processed_at);
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'sxm', 'array')),
    path TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    received_at TEXT,
    error TEXT,
    catch_up INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

_TRIGGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS trigger_firings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    frame_id TEXT,
    fired_at TEXT NOT NULL,
    observed REAL,
    event TEXT NOT NULL,
    results TEXT NOT NULL DEFAULT '[]'
);
"""

# Columns added in schema 2 (ALTER TABLE for stores written by schema 1).
_ADDED_COLUMNS = {"name": "TEXT", "message": "TEXT", "published_at": "TEXT", "frame_seq": "INTEGER"}

_JSON_COLUMNS = ("counts", "detections", "encoder", "timings", "scan", "message")


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat()


def _dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), allow_nan=False, default=str)


class StoreLock:
    """An exclusive lock on ``<store>.lock``: one agent per results store.

    ``flock(LOCK_EX | LOCK_NB)`` on a local file; the kernel releases it when the process ends,
    however it ends. The lock file holds the pid of its holder (for the message of the next one).

    Parameters
    ----------
    store_path : Path
        The SQLite file; the lock is ``store_path`` + ``.lock`` beside it.

    Raises
    ------
    StoreError
        Another process holds the lock (the message names its pid), or the lock file cannot be
        created (read-only folder, a symlink planted in its place ...).
    """

    def __init__(self, store_path: Path):
        self.path = Path(str(store_path) + ".lock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise StoreError(store_path, f"cannot create the lock file {self.path} ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StoreError(store_path, f"another stm-agent (pid {holder}) is using this results store "
                                         f"(lock {self.path}); stop it, or give this agent its own "
                                         "results.store") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (idempotent). The file stays; it is harmless without a holder."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


class ResultStore:
    """The SQLite results store (one file, WAL mode, safe to share between threads).

    Parameters
    ----------
    path : str | Path
        The SQLite file; its folder is created if missing. ``":memory:"`` for a private in-memory
        store (tests).
    lock : bool
        Take the store's lock (:class:`StoreLock`): the agent does; readers do not.

    Raises
    ------
    StoreError
        The file cannot be created/opened, is not an SQLite database, or WAL cannot be enabled;
        with ``lock``, another agent holds the store.
    """

    def __init__(self, path: str | Path, *, lock: bool = False):
        self.path = Path(path) if str(path) != ":memory:" else None
        self._lock = threading.RLock()
        self._store_lock: StoreLock | None = None
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if lock:
                    self._store_lock = StoreLock(self.path)
                # a new store is created 0640 before SQLite opens it (its -wal/-shm get the same mode)
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     _FILE_MODE))
                except FileExistsError:
                    pass
            # check_same_thread=False: the folder source's thread asks has() while the worker records;
            # every use of the connection is serialised by self._lock.
            self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if self.path is not None and str(mode).lower() != "wal":
                raise StoreError(path, f"cannot enable write-ahead logging (journal_mode is {mode})")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.executescript(_TRIGGER_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(frames)")}
            for col, typ in _ADDED_COLUMNS.items():
                if col not in have:
                    self._db.execute(f"ALTER TABLE frames ADD COLUMN {col} {typ}")
            self._db.execute("CREATE INDEX IF NOT EXISTS frames_unpublished ON frames (published_at) "
                             "WHERE published_at IS NULL")
            self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS frames_frame_seq ON frames (frame_seq)")
            if self._db.execute("SELECT 1 FROM frames WHERE frame_seq IS NULL LIMIT 1").fetchone():
                self._number_old_frames()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._release_lock()
            raise StoreError(path, f"cannot open the results database ({exc})") from exc
        except OSError as exc:
            self._release_lock()
            raise StoreError(path, f"cannot create the results store ({exc.strerror or exc})") from exc
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._store_lock is not None:
            self._store_lock.release()
            self._store_lock = None

    @contextmanager
    def _immediate(self):
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction (read and write under one write lock:
        atomic across processes); ROLLBACK on any error, which is re-raised."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back itself (disk full)
                self._db.execute("ROLLBACK")
            raise

    def _number_old_frames(self) -> None:
        """Give frames recorded by a schema < 3 store a ``frame_seq`` (in record order)."""
        with self._immediate() as db:
            top = db.execute("SELECT COALESCE(MAX(frame_seq), 0) FROM frames").fetchone()[0]
            ids = [r[0] for r in db.execute("SELECT rowid FROM frames WHERE frame_seq IS NULL ORDER BY rowid")]
            db.executemany("UPDATE frames SET frame_seq = ? WHERE rowid = ?",
                           [(top + i + 1, rid) for i, rid in enumerate(ids)])

    # ------------------------------------------------------------------ writing
    def _insert(self, row: dict[str, Any], message: dict[str, Any] | None) -> bool:
        """Insert the frames row and delete the inbox row in one ``BEGIN IMMEDIATE`` transaction.

        The next ``frame_seq`` is taken inside the transaction (gap-free: a number is used only by
        a committed row) and written into ``message`` (in place) before it is stored."""
        with self._lock:
            try:
                with self._immediate() as db:
                    known = db.execute("SELECT 1 FROM frames WHERE frame_id = ?", (row["frame_id"],)).fetchone()
                    if known is None:
                        n = int(db.execute("SELECT COALESCE(MAX(frame_seq), 0) + 1 FROM frames").fetchone()[0])
                        row["frame_seq"] = n
                        if message is not None:
                            message["frame_seq"] = n
                            row["message"] = _dumps(message)
                        cols = ", ".join(row)
                        marks = ", ".join("?" for _ in row)
                        db.execute(f"INSERT INTO frames ({cols}) VALUES ({marks})", tuple(row.values()))
                    db.execute("DELETE FROM inbox WHERE frame_id = ?", (row["frame_id"],))
            except sqlite3.Error as exc:
                raise StoreError(self.path or ":memory:", f"cannot record frame {row['frame_id']} ({exc})") from exc
            return known is None

    def record(
        self,
        result: FrameResult,
        path: str | Path | None,
        config_digest: str | None,
        received_at: datetime | None = None,
        *,
        name: str | None = None,
        message: dict[str, Any] | None = None,
        source: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> bool:
        """Record one frame result (ok or error). Idempotent: a known ``frame_id`` is left unchanged.

        Also removes the frame from the inbox, in the same transaction (see :meth:`complete`).

        Parameters
        ----------
        result : FrameResult
            The result; ``frame_id`` is the key.
        path : str | Path | None
            The file the frame was read from.
        config_digest : str | None
            ``AgentConfig.digest()`` of the configuration that produced it.
        received_at : datetime | None
            When the complete file was noticed (UTC); None if unknown.
        name : str | None
            Short name for people (file name, or the feed's name).
        message : dict | None
            The ``frame.counts`` message to publish (kept for re-publication and queries). Its
            ``frame_seq`` is set here, in place, to the number the frame is recorded under.
        source : str | None
            Overrides ``result.source`` (``folder`` / ``controller`` / ``nanonis``).
        body : dict | None
            ``result.to_json()`` when the caller has it already (it is not computed again).

        Returns
        -------
        bool
            True if a new row was written, False if the frame was already recorded.

        Raises
        ------
        StoreError
            The database cannot be written (disk full, locked for longer than 10 s ...).
        """
        body = body if body is not None else result.to_json()
        row = {
            "frame_id": result.frame_id,
            "source": source or result.source,
            "path": str(path) if path is not None else None,
            "received_at": _iso(received_at),
            "processed_at": _iso(result.processed_at) or _iso(datetime.now(timezone.utc)),
            "status": result.status,
            "reason": result.reason,
            "counts": _dumps(body["counts"]),
            "n_objects": int(body["n_objects"]),
            "detections": _dumps(body["detections"]),
            "encoder": _dumps(body["encoder"]),
            "timings": _dumps(body["timings_ms"]),
            "config_digest": config_digest,
            "scan": _dumps(body["scan"]),
            "name": name,
            "message": None,
        }
        return self._insert(row, message)

    def record_error(
        self,
        frame_id: str,
        path: str | Path | None,
        reason: str,
        *,
        source: str | None = None,
        config_digest: str | None = None,
        received_at: datetime | None = None,
        name: str | None = None,
        message: dict[str, Any] | None = None,
    ) -> bool:
        """Record a frame that could not be processed (status ``error`` with ``reason``).

        The file itself is left where it is. Idempotent like :meth:`record`; ``message`` gets its
        ``frame_seq`` in place.

        Returns
        -------
        bool
            True if a new row was written.

        Raises
        ------
        StoreError
            The database cannot be written.
        """
        row = {
            "frame_id": frame_id,
            "source": source or (str(path) if path is not None else "unknown"),
            "path": str(path) if path is not None else None,
            "received_at": _iso(received_at),
            "processed_at": _iso(datetime.now(timezone.utc)),
            "status": "error",
            "reason": str(reason),
            "config_digest": config_digest,
            "name": name,
            "message": None,
        }
        return self._insert(row, message)

    def mark_published(self, frame_id: str) -> None:
        """Note that the frame's messages went out (it is not re-published on the next start).

        Raises
        ------
        StoreError
            The database cannot be written.
        """
        self._exec("UPDATE frames SET published_at = ? WHERE frame_id = ?",
                   (_iso(datetime.now(timezone.utc)), frame_id))

    def unpublished(self) -> list[dict[str, Any]]:
        """Recorded frames whose messages may not have gone out (oldest first, JSON decoded)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM frames WHERE published_at IS NULL ORDER BY rowid").fetchall()
        return [self._row(r) for r in rows]  # type: ignore[misc]

    # ------------------------------------------------------------------ inbox (the on-disk queue)
    def enqueue(
        self,
        frame_id: str,
        *,
        source: str,
        kind: str = "file",
        path: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        received_at: datetime | None = None,
        error: str | None = None,
        catch_up: bool = False,
    ) -> bool:
        """Put a frame into the inbox unless it is recorded or already waiting.

        Parameters
        ----------
        frame_id : str
            sha256 hex of the scan bytes.
        source : str
            ``folder`` / ``controller`` / ``nanonis``.
        kind : {"file", "sxm", "array"}
            How to read ``path``: a scan file, a spooled .sxm payload, a spooled raw array.
        path : str | Path | None
            The file to read.
        meta : dict | None
            JSON-able header (array description, name ...).
        received_at : datetime | None
            When it arrived (UTC).
        error : str | None
            Set for frames that arrive as failures (incomplete file ...): recorded as errors.
        catch_up : bool
            Found by the catch-up at start.

        Returns
        -------
        bool
            True if queued; False if this frame_id is recorded or waiting already.

        Raises
        ------
        StoreError
            The database cannot be written (disk full ...).
        """
        cur = self._exec(
            "INSERT OR IGNORE INTO inbox (frame_id, source, kind, path, meta, received_at, error, catch_up) "
            "SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM frames WHERE frame_id = ?)",
            (frame_id, source, kind, str(path) if path is not None else None, _dumps(meta or {}),
             _iso(received_at), error, int(bool(catch_up)), frame_id))
        return cur.rowcount == 1

    def claim(self) -> dict[str, Any] | None:
        """The oldest waiting frame, its ``attempts`` counter incremented first (so a frame that
        kills the agent every time can be given up); None when the inbox is empty.

        Raises
        ------
        StoreError
            The database cannot be written.
        """
        with self._lock:
            r = self._db.execute("SELECT * FROM inbox ORDER BY id LIMIT 1").fetchone()
            if r is None:
                return None
            self._exec("UPDATE inbox SET attempts = attempts + 1 WHERE id = ?", (r["id"],))
            out = dict(r)
        out["attempts"] += 1
        out["meta"] = json.loads(out["meta"] or "{}")
        out["catch_up"] = bool(out["catch_up"])
        return out

    def pending_count(self) -> int:
        """Frames waiting in the inbox."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])

    def reserve_seq(self, block: int) -> int:
        """Reserve ``block`` message sequence numbers; returns the first one.

        Sequence numbers so survive restarts: a restarted publisher starts after everything ever
        reserved (numbers reserved but not used are skipped: gaps, never repeats).

        Raises
        ------
        StoreError
            The database cannot be written.
        """
        with self._lock:
            try:
                with self._immediate() as db:
                    r = db.execute("SELECT value FROM meta WHERE key = 'seq_reserved'").fetchone()
                    first = int(r[0]) + 1 if r is not None else 1
                    db.execute("INSERT INTO meta (key, value) VALUES ('seq_reserved', ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                               (str(first + block - 1),))
            except sqlite3.Error as exc:
                raise StoreError(self.path or ":memory:", f"cannot reserve sequence numbers ({exc})") from exc
            return first

    def release_claim(self, inbox_id: int) -> None:
        """Undo the ``attempts`` increment of :meth:`claim` (the frame was not processed because the
        store could not be written, not because it killed the agent). Best effort: errors are ignored."""
        with self._lock:
            try:
                self._db.execute("UPDATE inbox SET attempts = MAX(attempts - 1, 0) WHERE id = ?", (inbox_id,))
            except sqlite3.Error:
                pass

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StoreError(self.path or ":memory:", f"cannot write the results database ({exc})") from exc

    # ------------------------------------------------------------------ reading
    def has(self, frame_id: str) -> bool:
        """True if ``frame_id`` (sha256 hex) is recorded (ok or error) or waiting in the inbox."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM frames WHERE frame_id = ? UNION ALL SELECT 1 FROM inbox WHERE frame_id = ?",
                (frame_id, frame_id)).fetchone() is not None

    @staticmethod
    def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
        if r is None:
            return None
        out = dict(r)
        for k in _JSON_COLUMNS:
            out[k] = json.loads(out[k]) if out[k] is not None else None
        return out

    def get(self, frame_id: str) -> dict[str, Any] | None:
        """The record of ``frame_id`` as a dict (JSON columns decoded), or None if unknown.

        A unique prefix of at least 8 hex characters is accepted too.
        """
        with self._lock:
            r = self._db.execute("SELECT * FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
            if r is None and 8 <= len(frame_id) < 64 and all(c in "0123456789abcdef" for c in frame_id):
                rows = self._db.execute("SELECT * FROM frames WHERE frame_id LIKE ? LIMIT 2",
                                        (frame_id + "%",)).fetchall()
                r = rows[0] if len(rows) == 1 else None
        return self._row(r)

    def latest(self, n: int = 1) -> list[dict[str, Any]]:
        """The ``n`` most recently recorded frames, newest first (JSON columns decoded)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM frames ORDER BY processed_at DESC, rowid DESC LIMIT ?", (int(n),)
            ).fetchall()
        return [self._row(r) for r in rows]  # type: ignore[misc]

    def since(self, frame_seq: int, limit: int = SINCE_LIMIT) -> list[dict[str, Any]]:
        """Frames recorded after ``frame_seq`` (``frame_seq > n``), oldest first, at most ``limit``.

        Subscribers that saw a gap in ``frame_seq`` ask for what they missed with it (query
        ``since <n>``); ``since(0)`` starts from the first frame.
        """
        with self._lock:
            rows = self._db.execute("SELECT * FROM frames WHERE frame_seq > ? ORDER BY frame_seq LIMIT ?",
                                    (int(frame_seq), max(int(limit), 0))).fetchall()
        return [self._row(r) for r in rows]  # type: ignore[misc]

    def last_frame_seq(self) -> int:
        """The highest ``frame_seq`` recorded (0 for an empty store)."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(frame_seq), 0) FROM frames").fetchone()[0])

    def count(self, status: str | None = None) -> int:
        """Number of recorded frames, all or with ``status`` ``"ok"`` / ``"error"``."""
        with self._lock:
            if status is None:
                return int(self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM frames WHERE status = ?", (status,)).fetchone()[0])

    # ------------------------------------------------------------------ trigger firings
    def record_firing(self, event: dict[str, Any]) -> int:
        """Record one firing of a trigger rule (``event``: the ``trigger.fired`` body); returns its id.

        ``results`` starts as one ``null`` per action of the event; :meth:`set_action_result` fills them.

        Raises
        ------
        StoreError
            The database cannot be written.
        """
        n = len(event.get("actions") or [])
        cur = self._exec(
            "INSERT INTO trigger_firings (rule, frame_id, fired_at, observed, event, results) VALUES (?, ?, ?, ?, ?, ?)",
            (event["rule"], event.get("frame_id"), event.get("fired_at") or _iso(datetime.now(timezone.utc)),
             jsonable(event.get("observed")), _dumps(event), _dumps([None] * n)))
        return int(cur.lastrowid)

    def set_action_result(self, firing_id: int, index: int, result: dict[str, Any]) -> None:
        """Store the result of action ``index`` of firing ``firing_id`` (exit status, what was sent ...).

        Raises
        ------
        StoreError
            The database cannot be written.
        """
        with self._lock:
            r = self._db.execute("SELECT results FROM trigger_firings WHERE id = ?", (firing_id,)).fetchone()
            if r is None:
                return
            results = json.loads(r[0] or "[]")
            results.extend([None] * (index + 1 - len(results)))
            results[index] = result
            self._exec("UPDATE trigger_firings SET results = ? WHERE id = ?", (_dumps(results), firing_id))

    def firings(self, limit: int = 100, since: str | None = None) -> list[dict[str, Any]]:
        """Trigger firings, newest first: ``id``, ``rule``, ``frame_id``, ``fired_at``, ``observed``,
        ``event`` and ``results`` (JSON decoded); only those fired at or after ``since`` (ISO 8601)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM trigger_firings WHERE fired_at >= ? ORDER BY id DESC LIMIT ?",
                (since or "", int(limit))).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["event"], d["results"] = json.loads(d["event"]), json.loads(d["results"])
            out.append(d)
        return out

    def journal_mode(self) -> str:
        """The SQLite journal mode in use (``"wal"`` for a file store)."""
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def close(self) -> None:
        """Checkpoint the WAL and close the connection (idempotent)."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._db = None  # type: ignore[assignment]
            self._release_lock()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
