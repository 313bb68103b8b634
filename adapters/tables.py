"""Export the results store as tables: CSV, JSON or Parquet, one row per frame or per object.

The SQLite file is opened READ-ONLY (``mode=ro``), so exporting while the agent runs is safe (WAL
lets readers in while the agent writes).

Table ``frames`` (one row per recorded frame, oldest first), columns in this order::

    frame_id, name, source, path, received_at, processed_at, status, reason, n_objects,
    channel (the channel analysed), encoder (name), encoder_id, bias_V, setpoint_A, pixels_x, pixels_y (pixels),
    range_x_nm, range_y_nm (scan range, nm), area_nm2 (range_x_nm * range_y_nm, nm^2),
    count_<species> ..., density_<species>_per_nm2 ... (count / area_nm2), config_digest

Species columns cover every species seen in any frame (sorted, ``other`` last). A cell is empty
(None) where the frame has no count for that species: error frames, or frames recognised before
the species was added to the library. Densities are per nm^2 of the whole scan frame (an aborted
scan is not corrected for its missing lines).

Table ``objects`` (one row per detection, objects cut by the edge included with ``touches_edge``)::

    frame_id, object (index in the frame), species, similarity, touches_edge,
    centroid_x_nm, centroid_y_nm, centroid_x_px, centroid_y_px,
    bbox_x_px, bbox_y_px, bbox_w_px, bbox_h_px, area_nm2, pose_angle_deg, pose_mirrored,
    score_<species> ... (best similarity per species)

Floats carry 12 significant digits (no conversion noise such as ``9.999996999999999``).
CSV: header row, empty cell for None. JSON: an array of row objects. Parquet needs pyarrow
(``pip install "stm-agent[parquet]"``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sqlite3
from pathlib import Path
from typing import IO, Any, Literal

from stm_agent.agent.errors import StmAgentError, StoreError

__all__ = ["export_results", "read_rows", "ExportError", "FRAME_COLUMNS", "OBJECT_COLUMNS"]

log = logging.getLogger(__name__)

Format = Literal["csv", "json", "parquet"]
TableName = Literal["frames", "objects"]

FRAME_COLUMNS = ("frame_id", "name", "source", "path", "received_at", "processed_at", "status", "reason",
                 "n_objects", "channel", "encoder", "encoder_id", "bias_V", "setpoint_A", "pixels_x", "pixels_y",
                 "range_x_nm", "range_y_nm", "area_nm2")
OBJECT_COLUMNS = ("frame_id", "object", "species", "similarity", "touches_edge", "centroid_x_nm", "centroid_y_nm",
                  "centroid_x_px", "centroid_y_px", "bbox_x_px", "bbox_y_px", "bbox_w_px", "bbox_h_px", "area_nm2",
                  "pose_angle_deg", "pose_mirrored")


class ExportError(StmAgentError):
    """The export cannot be written: unknown format/table, pyarrow missing, output not writable."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def _species_order(names: set[str]) -> list[str]:
    return sorted(n for n in names if n != "other") + (["other"] if "other" in names else [])


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default


def _pair(v: Any) -> tuple[Any, Any]:
    return (v[0], v[1]) if isinstance(v, (list, tuple)) and len(v) >= 2 else (None, None)


def _clean(v: Any) -> Any:
    """A cell as exported: NaN/inf -> None; floats to 12 significant digits, so the noise of unit
    conversions (``9.999996999999999`` for 9.999997 nm) and of products does not reach the table."""
    if not isinstance(v, float):
        return v
    return float(f"{v:.12g}") if math.isfinite(v) else None


def _connect(store_path: Path) -> sqlite3.Connection:
    store_path = Path(store_path)
    if not store_path.is_file():
        raise StoreError(store_path, "no results database here")
    try:
        db = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        db.row_factory = sqlite3.Row
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='frames'").fetchone() is None:
            db.close()
            raise StoreError(store_path, "not a stm-agent results database (no table frames)")
    except sqlite3.Error as exc:
        raise StoreError(store_path, f"cannot read the results database ({exc})") from exc
    return db


def read_rows(store_path: Path, table: TableName = "frames") -> tuple[list[str], list[dict[str, Any]]]:
    """The rows of the ``frames`` or ``objects`` table (see the module docstring).

    Parameters
    ----------
    store_path : Path
        The SQLite results store (opened read-only).
    table : {"frames", "objects"}

    Returns
    -------
    (columns, rows)
        Column names in order; rows as dicts with every column (None where unknown).

    Raises
    ------
    StoreError
        The file is missing, not SQLite, or not a results store.
    ExportError
        Unknown ``table``.
    """
    if table not in ("frames", "objects"):
        raise ExportError(table, "unknown table; use frames or objects")
    db = _connect(store_path)
    try:
        have = {r[1] for r in db.execute("PRAGMA table_info(frames)")}
        name_col = "name" if "name" in have else "NULL AS name"
        rows = db.execute(f"SELECT frame_id, {name_col}, source, path, received_at, processed_at, status, reason, "
                          "counts, n_objects, detections, encoder, config_digest, scan FROM frames "
                          "ORDER BY processed_at, rowid").fetchall()
    except sqlite3.Error as exc:
        raise StoreError(store_path, f"cannot read the results database ({exc})") from exc
    finally:
        db.close()
    return _frame_rows(rows) if table == "frames" else _object_rows(rows)


def _frame_rows(rows: list[sqlite3.Row]) -> tuple[list[str], list[dict[str, Any]]]:
    decoded = [(r, _loads(r["counts"], {}), _loads(r["scan"], {}) or {}, _loads(r["encoder"], {}) or {})
               for r in rows]
    species = _species_order({s for _, counts, _, _ in decoded for s in counts})
    columns = list(FRAME_COLUMNS) + [f"count_{s}" for s in species] + \
        [f"density_{s}_per_nm2" for s in species] + ["config_digest"]
    out = []
    for r, counts, scan, enc in decoded:
        px, py = _pair(scan.get("pixels"))
        wx, wy = _pair(scan.get("range_nm"))
        area = float(wx) * float(wy) if wx is not None and wy is not None else None
        row: dict[str, Any] = {
            "frame_id": r["frame_id"], "name": r["name"], "source": r["source"], "path": r["path"],
            "received_at": r["received_at"], "processed_at": r["processed_at"], "status": r["status"],
            "reason": r["reason"], "n_objects": r["n_objects"], "channel": scan.get("channel"),
            "encoder": enc.get("name"),
            "encoder_id": enc.get("id"), "bias_V": scan.get("bias_V"), "setpoint_A": scan.get("setpoint_A"),
            "pixels_x": px, "pixels_y": py, "range_x_nm": wx, "range_y_nm": wy, "area_nm2": area,
        }
        for s in species:
            row[f"count_{s}"] = counts.get(s)
        for s in species:
            n = counts.get(s)
            row[f"density_{s}_per_nm2"] = n / area if n is not None and area else None
        row["config_digest"] = r["config_digest"]
        out.append({k: _clean(v) for k, v in row.items()})
    return columns, out


def _object_rows(rows: list[sqlite3.Row]) -> tuple[list[str], list[dict[str, Any]]]:
    per_frame = [(r["frame_id"], _loads(r["detections"], []) or []) for r in rows]
    species = _species_order({s for _, dets in per_frame for d in dets for s in (d.get("scores") or {})})
    columns = list(OBJECT_COLUMNS) + [f"score_{s}" for s in species]
    out = []
    for frame_id, dets in per_frame:
        for i, d in enumerate(dets):
            cx, cy = _pair(d.get("centroid_nm"))
            px, py = _pair(d.get("centroid_px"))
            bbox = d.get("bbox_px") or [None] * 4
            pose = d.get("pose") or {}
            row: dict[str, Any] = {
                "frame_id": frame_id, "object": i, "species": d.get("species"), "similarity": d.get("similarity"),
                "touches_edge": d.get("touches_edge"), "centroid_x_nm": cx, "centroid_y_nm": cy,
                "centroid_x_px": px, "centroid_y_px": py, "bbox_x_px": bbox[0], "bbox_y_px": bbox[1],
                "bbox_w_px": bbox[2], "bbox_h_px": bbox[3], "area_nm2": d.get("area_nm2"),
                "pose_angle_deg": pose.get("angle_deg"), "pose_mirrored": pose.get("mirrored"),
            }
            scores = d.get("scores") or {}
            for s in species:
                row[f"score_{s}"] = scores.get(s)
            out.append({k: _clean(v) for k, v in row.items()})
    return columns, out


def _write_parquet(columns: list[str], rows: list[dict[str, Any]], out: Path | IO[bytes]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(str(out), 'Parquet export needs pyarrow: pip install "stm-agent[parquet]"') from None
    table = pa.table({c: pa.array([r[c] for r in rows]) for c in columns})
    pq.write_table(table, out if not isinstance(out, Path) else str(out))


def export_results(store_path: Path, out: Path | IO[str], fmt: Format = "csv", table: TableName = "frames") -> int:
    """Write the ``frames`` or ``objects`` table of a results store to ``out``.

    Parameters
    ----------
    store_path : Path
        The SQLite results store (``results.store`` of the config); opened read-only.
    out : Path or text stream
        Output file (overwritten), or an open text stream such as ``sys.stdout`` for csv/json.
    fmt : {"csv", "json", "parquet"}
    table : {"frames", "objects"}
        One row per frame, or one row per detected object.

    Returns
    -------
    int
        Rows written (without the CSV header).

    Raises
    ------
    StoreError
        The store is missing or unreadable.
    ExportError
        Unknown format/table, parquet to a text stream, pyarrow missing, ``out`` not writable.
    BrokenPipeError
        ``out`` is a pipe whose reader has gone (``stm-agent results export | head``).
    """
    if fmt not in ("csv", "json", "parquet"):
        raise ExportError(fmt, "unknown format; use csv, json or parquet")
    if fmt == "parquet" and not isinstance(out, Path):
        raise ExportError("stdout", "Parquet is binary: give an output file")
    columns, rows = read_rows(Path(store_path), table)
    try:
        if fmt == "parquet":
            _write_parquet(columns, rows, out)  # type: ignore[arg-type]
        elif isinstance(out, Path):
            with open(out, "w", encoding="utf-8", newline="") as f:
                _write_text(fmt, columns, rows, f)
        else:
            _write_text(fmt, columns, rows, out)
    except BrokenPipeError:
        raise  # the reader of a pipe went away (`| head`): the caller decides, it is no write error
    except OSError as exc:
        raise ExportError(str(out), f"cannot write the export ({exc.strerror or exc})") from exc
    log.info("exported %d %s rows of %s as %s", len(rows), table, store_path, fmt)
    return len(rows)


def _write_text(fmt: str, columns: list[str], rows: list[dict[str, Any]], f: IO[str]) -> None:
    if fmt == "csv":
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        f.write("[\n")
        f.write(",\n".join(json.dumps(r, allow_nan=False) for r in rows))
        f.write("\n]\n" if rows else "]\n")
