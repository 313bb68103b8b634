"""What the dashboard reads: the agent's SQLite store (read only), its display images and the
reference library; and the two changes a token holder may make (add / remove a reference).

The store is opened read-only (``mode=ro``), one short-lived connection per call, so the
dashboard works beside a running agent (WAL: readers never block the writer) and against a
stopped agent's store alike.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from stm_agent.adapters.outputs import display_dir
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.errors import DuplicateReferenceError, StmAgentError
from stm_agent.agent.triggers import frame_area_nm2

__all__ = ["DashboardData", "DataError"]

# species and reference ids as the library names them: no path separator, no leading dot
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_FRAME_COLS = "frame_id, name, path, source, processed_at, received_at, status, reason, counts, n_objects, scan, message"


class DataError(StmAgentError):
    """A request the dashboard cannot serve (unknown frame, frame that cannot be re-read ...);
    :attr:`status` is the HTTP status to answer with."""

    def __init__(self, reason: str, status: int = 400):
        self.reason, self.status = reason, status
        super().__init__(reason)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def frame_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The page's view of one ``frames`` row: counts, density per nm^2, scan, status, latency."""
    counts = _json(row["counts"], {}) if isinstance(row["counts"], (str, type(None))) else row["counts"]
    scan = _json(row["scan"], {}) if isinstance(row["scan"], (str, type(None))) else row["scan"]
    msg = _json(row["message"], {}) if isinstance(row["message"], (str, type(None))) else (row["message"] or {})
    area = frame_area_nm2(scan)
    return {
        "frame_id": row["frame_id"],
        "name": row["name"] or Path(str(row["path"] or row["frame_id"])).name,
        "source": row["source"],
        "processed_at": row["processed_at"],
        "status": row["status"],
        "reason": row["reason"],
        "counts": counts,
        "n_objects": row["n_objects"],
        "area_nm2": area,
        "density": {k: v / area for k, v in counts.items()} if area else None,
        "latency_ms": msg.get("latency_ms"),
        "encoder": (msg.get("encoder") or {}).get("id"),
        "scan": {k: scan.get(k) for k in ("pixels", "range_nm", "pixel_size_nm", "bias_V", "setpoint_A", "direction",
                                           "angle_deg", "completeness", "acquired_at", "channel")} if scan else None,
    }


class DashboardData:
    """Read access to one agent's results, and reference edits.

    Parameters
    ----------
    cfg : AgentConfig
        The agent's configuration: ``results.store``, ``references.folder``, channel, segmentation.
    """

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.store = Path(cfg.results.store)
        self.display = display_dir(self.store)
        self.refs = Path(cfg.references.folder)

    # ------------------------------------------------------------------ store
    def _connect(self) -> sqlite3.Connection | None:
        if not self.store.is_file():
            return None
        db = sqlite3.connect(f"file:{self.store.resolve()}?mode=ro", uri=True, timeout=5.0)
        db.row_factory = sqlite3.Row
        return db

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        db = self._connect()
        if db is None:
            return []
        try:
            return [dict(r) for r in db.execute(sql, args).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a store written before triggers existed
                return []
            raise DataError(f"{self.store}: cannot read the results store ({exc})", 503) from exc
        finally:
            db.close()

    def frames(self, since: str | None = None, limit: int = 2000) -> list[dict[str, Any]]:
        """Frame summaries processed at or after ``since`` (ISO 8601), the newest ``limit``, oldest first."""
        rows = self._query(f"SELECT {_FRAME_COLS} FROM frames WHERE processed_at >= ? "
                           "ORDER BY processed_at DESC, rowid DESC LIMIT ?", (since or "", int(limit)))
        return [frame_summary(r) for r in reversed(rows)]

    def scan_paths(self, since: str | None = None, limit: int = 500) -> list[str]:
        """Paths of the ``.sxm`` scans of the newest ``limit`` frames processed (status ok) at or
        after ``since`` that can still be read, oldest first, each once."""
        rows = self._query("SELECT path FROM frames WHERE status = 'ok' AND processed_at >= ? "
                           "ORDER BY processed_at DESC, rowid DESC LIMIT ?", (since or "", int(limit)))
        out = dict.fromkeys(r["path"] for r in reversed(rows)
                            if r["path"] and Path(r["path"]).suffix.lower() == ".sxm" and Path(r["path"]).is_file())
        return list(out)

    def frame(self, frame_id: str) -> dict[str, Any]:
        """Summary + ``detections`` + whether a display image is kept.

        Raises
        ------
        DataError
            (404) unknown frame.
        """
        rows = self._query(f"SELECT {_FRAME_COLS}, detections FROM frames WHERE frame_id = ?", (frame_id,))
        if not rows:
            raise DataError(f"no frame {frame_id} in {self.store}", 404)
        out = frame_summary(rows[0])
        out["detections"] = _json(rows[0]["detections"], [])
        out["image"] = (self.display / f"{frame_id}.png").is_file()
        # the channel analysed (``channel: auto`` picks one per frame), else the configured one
        out["channel"] = (out["scan"] or {}).get("channel") or self.cfg.channel
        out["direction"] = self.cfg.direction
        return out

    def resolve(self, frame_id: str) -> str:
        """The full frame id of a recorded frame given in full or by a unique prefix (>= 8 hex).

        Raises
        ------
        DataError
            (404) unknown or ambiguous.
        """
        if not 8 <= len(frame_id) <= 64 or any(c not in "0123456789abcdef" for c in frame_id):
            raise DataError("a frame id is 8 to 64 lowercase hex characters", 400)
        rows = self._query("SELECT frame_id FROM frames WHERE frame_id LIKE ? LIMIT 2", (frame_id + "%",))
        if len(rows) != 1:
            raise DataError(f"no single frame {frame_id}", 404)
        return rows[0]["frame_id"]

    def image_path(self, frame_id: str) -> Path:
        """The display PNG of a frame.

        Raises
        ------
        DataError
            (404) not kept (older than ``dashboard.keep_images`` frames, or an error frame).
        """
        if len(frame_id) != 64 or any(c not in "0123456789abcdef" for c in frame_id):
            raise DataError("a frame id is 64 hex characters", 400)
        p = self.display / f"{frame_id}.png"
        if not p.is_file():
            raise DataError(f"no display image kept for frame {frame_id[:12]}", 404)
        return p

    def firings(self, since: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Trigger firings, newest first (event and action results decoded)."""
        rows = self._query("SELECT * FROM trigger_firings WHERE fired_at >= ? ORDER BY id DESC LIMIT ?",
                           (since or "", int(limit)))
        for r in rows:
            r["event"], r["results"] = _json(r["event"], {}), _json(r["results"], [])
        return rows

    @staticmethod
    def since(range_: str, uptime_s: float | None) -> str | None:
        """ISO start of a history range: ``session`` (since the agent started; all when unknown),
        ``1h``, ``24h``, ``all``."""
        now = datetime.now(timezone.utc)
        if range_ == "1h":
            return (now - timedelta(hours=1)).isoformat()
        if range_ == "24h":
            return (now - timedelta(hours=24)).isoformat()
        if range_ == "session" and uptime_s is not None:
            return (now - timedelta(seconds=float(uptime_s) + 1.0)).isoformat()
        return None

    # ------------------------------------------------------------------ references
    def references(self) -> list[dict[str, Any]]:
        """The library as a gallery: species, id, source scan, position (nm, px), created."""
        from stm_agent.adapters.references import ReferenceLibrary

        try:
            entries = ReferenceLibrary(self.refs).entries(require=False)
        except StmAgentError as exc:
            raise DataError(str(exc), 503) from exc
        out = []
        for e in entries:
            p = e.provenance
            out.append({"species": e.species, "id": e.path.stem,
                        "scan": Path(str(p.get("scan") or p.get("image") or "")).name or None,
                        "frame_id": p.get("frame_id"), "position_nm": p.get("position_nm"),
                        "position_px": p.get("position_px"), "area_nm2": p.get("area_nm2"),
                        "created": p.get("created")})
        return out

    def _ref_file(self, species: str, ref_id: str, suffix: str) -> Path:
        if not _NAME_RE.match(species) or not _NAME_RE.match(ref_id):
            raise DataError("bad species or reference id", 400)
        p = self.refs / species / f"{ref_id}{suffix}"
        if not p.is_file():
            raise DataError(f"no reference {species}/{ref_id}", 404)
        return p

    def reference_png(self, species: str, ref_id: str) -> bytes:
        """8-bit PNG of a reference crop (min-max stretched)."""
        import cv2

        c = np.load(self._ref_file(species, ref_id, ".npy")).astype(np.float32)
        lo, hi = float(c.min()), float(c.max())
        g = np.round((c - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
        ok, buf = cv2.imencode(".png", g)
        return buf.tobytes()

    def add_reference(self, frame_id: str, x_px: float, y_px: float, species: str) -> dict[str, Any]:
        """Make the object at ``(x_px, y_px)`` of a recorded frame a reference of ``species``.

        The scan is read again from the path recorded in the store and cut exactly as
        ``stm-agent refs add --px`` does (:func:`agent.pipeline.reference_crop_at`).

        Raises
        ------
        DataError
            Unknown frame (404), scan no longer readable or not a file (409), no object there or
            a bad species name (422), the object is already a reference (409).
        """
        from stm_agent.adapters.references import ReferenceLibrary
        from stm_agent.adapters.scanfile import read_scan
        from stm_agent.agent.pipeline import library_defect_sizes, reference_crop_at

        rows = self._query("SELECT path, status FROM frames WHERE frame_id = ?", (frame_id,))
        if not rows:
            raise DataError(f"no frame {frame_id}", 404)
        path = rows[0]["path"]
        if not path or Path(path).suffix == ".array" or not Path(path).is_file():
            raise DataError(f"the scan of frame {frame_id[:12]} cannot be read again ({path or 'no file'})", 409)
        try:
            scan = read_scan(path)
            lib = ReferenceLibrary(self.refs)
            sizes = library_defect_sizes([(e.pixel_size_nm, e.provenance, e.extent_nm) for e in lib.entries(require=False)])
            crop, px, prov = reference_crop_at(scan, float(x_px), float(y_px), self.cfg, units="px", defect_sizes_nm=sizes)
            npy = lib.add(species, crop, px, prov)
        except DuplicateReferenceError as exc:
            raise DataError(str(exc), 409) from exc
        except StmAgentError as exc:
            raise DataError(str(exc), 422) from exc
        return {"species": species, "id": npy.stem, "scan": Path(path).name, "position_nm": prov["position_nm"],
                "position_px": prov["position_px"]}

    def remove_reference(self, species: str, ref_id: str) -> None:
        """Delete a reference (its .npy, .png, .json); the species folder too when it is empty.

        Raises
        ------
        DataError
            (404) no such reference.
        """
        npy = self._ref_file(species, ref_id, ".npy")
        for suffix in (".npy", ".png", ".json"):
            npy.with_suffix(suffix).unlink(missing_ok=True)
        folder = npy.parent
        if not any(p.suffix == ".npy" for p in folder.iterdir()):
            for p in folder.iterdir():
                p.unlink(missing_ok=True)
            folder.rmdir()
