"""SQLite record of every frame the agent has seen (ok or error), keyed by the sha256 of the file.

The store is what makes the agent idempotent: a frame whose ``frame_id`` (sha256 of the file
bytes) is already recorded is never processed again, whatever its file name, and a restarted agent
knows what it has done. Write-ahead logging (WAL) lets other processes read the file while the
agent writes. The store never touches the scan files themselves (unreadable files are recorded,
never deleted or moved).

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
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.domain import FrameResult
from agent.errors import StoreError

__all__ = ["ResultStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

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
"""

_JSON_COLUMNS = ("counts", "detections", "encoder", "timings", "scan")


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat()


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None so the JSON stays standard (RFC 8259 has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_finite(obj), allow_nan=False, default=str)


class ResultStore:
    """The SQLite results store (one file, WAL mode, safe to share between threads).

    Parameters
    ----------
    path : str | Path
        The SQLite file; its folder is created if missing. ``":memory:"`` for a private in-memory
        store (tests).

    Raises
    ------
    StoreError
        The file cannot be created/opened, is not an SQLite database, or WAL cannot be enabled.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path) if str(path) != ":memory:" else None
        self._lock = threading.RLock()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: the folder source's thread asks has() while the worker records;
            # every use of the connection is serialised by self._lock.
            self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if self.path is not None and str(mode).lower() != "wal":
                raise StoreError(path, f"cannot enable write-ahead logging (journal_mode is {mode})")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(path, f"cannot open the results database ({exc})") from exc
        except OSError as exc:
            raise StoreError(path, f"cannot create the results folder ({exc.strerror or exc})") from exc

    # ------------------------------------------------------------------ writing
    def _insert(self, row: dict[str, Any]) -> bool:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            try:
                cur = self._db.execute(f"INSERT OR IGNORE INTO frames ({cols}) VALUES ({marks})", tuple(row.values()))
            except sqlite3.Error as exc:
                raise StoreError(self.path or ":memory:", f"cannot record frame {row['frame_id']} ({exc})") from exc
            return cur.rowcount == 1

    def record(
        self,
        result: FrameResult,
        path: str | Path | None,
        config_digest: str | None,
        received_at: datetime | None = None,
    ) -> bool:
        """Record one frame result (ok or error). Idempotent: a known ``frame_id`` is left unchanged.

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

        Returns
        -------
        bool
            True if a new row was written, False if the frame was already recorded.

        Raises
        ------
        StoreError
            The database cannot be written (disk full, locked for longer than 10 s ...).
        """
        body = result.to_json()
        row = {
            "frame_id": result.frame_id,
            "source": result.source,
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
        }
        return self._insert(row)

    def record_error(
        self,
        frame_id: str,
        path: str | Path | None,
        reason: str,
        *,
        source: str | None = None,
        config_digest: str | None = None,
        received_at: datetime | None = None,
    ) -> bool:
        """Record a frame that could not be processed (status ``error`` with ``reason``).

        The file itself is left where it is. Idempotent like :meth:`record`.

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
        }
        return self._insert(row)

    # ------------------------------------------------------------------ reading
    def has(self, frame_id: str) -> bool:
        """True if ``frame_id`` (sha256 hex) is recorded (ok or error)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM frames WHERE frame_id = ?", (frame_id,)).fetchone() is not None

    @staticmethod
    def _row(r: sqlite3.Row | None) -> dict[str, Any] | None:
        if r is None:
            return None
        out = dict(r)
        for k in _JSON_COLUMNS:
            out[k] = json.loads(out[k]) if out[k] is not None else None
        return out

    def get(self, frame_id: str) -> dict[str, Any] | None:
        """The record of ``frame_id`` as a dict (JSON columns decoded), or None if unknown."""
        with self._lock:
            r = self._db.execute("SELECT * FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        return self._row(r)

    def latest(self, n: int = 1) -> list[dict[str, Any]]:
        """The ``n`` most recently recorded frames, newest first (JSON columns decoded)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM frames ORDER BY processed_at DESC, rowid DESC LIMIT ?", (int(n),)
            ).fetchall()
        return [self._row(r) for r in rows]  # type: ignore[misc]

    def count(self, status: str | None = None) -> int:
        """Number of recorded frames, all or with ``status`` ``"ok"`` / ``"error"``."""
        with self._lock:
            if status is None:
                return int(self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM frames WHERE status = ?", (status,)).fetchone()[0])

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

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
