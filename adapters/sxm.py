"""Reader for Nanonis ``.sxm`` scan files (NANONIS_VERSION 2), robust against bad input.

File layout (Nanonis help, "SXM file format"; checked on every file in ``../shared/data/sxm``)::

    :KEY:\\n value line(s)\\n :KEY:\\n ... :SCANIT_END:\\n\\n\\n \\x1a\\x04 <data>

The header is text in the Windows code page (cp1252 / Latin-1: a degree sign is the single byte
0xB0). Sections start with a line ``:KEY:``; the following lines up to the next key are the value.
``:DATA_INFO:`` and ``:Z-CONTROLLER:`` are tab-separated tables. The data block is
``SCANIT_TYPE`` (``FLOAT MSBFIRST`` = big-endian float32, SI units): for every channel of
DATA_INFO, in order, the forward frame and/or the backward frame (Direction column ``both``,
``forward`` or ``backward``), each ``ny`` rows of ``nx`` values (``SCAN_PIXELS nx ny``).

Orientation (see docs/ingestion.md for the evidence): the stored rows of an ``up`` scan run from
the bottom of the image to the top, so they are flipped vertically; backward frames are stored
mirrored left-right and are un-mirrored. The result is the view of the Nanonis scan window:
row 0 at the top, backward overlaying forward.

Why not ``nanonispy2.read.Scan``: it decodes the header as UTF-8 with replacement (a cp1252 degree
sign becomes U+FFFD), assumes every channel is recorded ``both`` ways, reads the whole file
without checking its size against the header (a truncated file gives a bare ``ValueError`` from
``reshape``; ``SCAN_PIXELS 1000000000 1000000000`` is accepted), does not orient frames, and its
header parser ``_parse_sxm_header`` raises ``IndexError`` on the ProbeFlow/Createc-converted
headers in the test data (a blank line inside a section), keeps only the first line of multi-line
values other than COMMENT and raises ``KeyError`` when an optional key is absent. The header
format is simple, so it is parsed here; the tests use nanonispy2's parser as an independent
cross-check on the files it can read.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from datetime import datetime
from pathlib import Path
import numpy as np

from stm_agent.adapters.files import Roots, open_regular
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import EmptyScanError, RefusedPathError, ScanFormatError

__all__ = [
    "read_sxm",
    "expected_size",
    "expected_file_size",
    "parse_header",
    "read_header_prefix",
    "MAX_HEADER_BYTES",
    "MAX_SIDE_PX",
    "MAX_DATA_BYTES",
    "MAX_FILE_BYTES",
    "RANGE_LIMITS_M",
]

MAGIC = b":NANONIS_VERSION:"
END_TAG = b":SCANIT_END:"
MARKER = b"\x1a\x04"
#: Largest header accepted (real headers are 0.7-12 KiB; converters pad with NULs).
MAX_HEADER_BYTES = 1 << 20
#: Largest SCAN_PIXELS side accepted (Nanonis allows at most 16384 pixels per line).
MAX_SIDE_PX = 65536
#: Largest data block accepted, bytes (1 GiB, e.g. 8192 x 8192 px x 4 frames: the bytes are held in
#: memory once and each frame is copied once to native float32, so a frame costs about twice this).
MAX_DATA_BYTES = 1 << 30
#: Largest file accepted, bytes (checked on the open descriptor before anything is read).
MAX_FILE_BYTES = MAX_DATA_BYTES + MAX_HEADER_BYTES + 64
#: SCAN_RANGE accepted per side, m (1 pm .. 1 m; beyond, nm values overflow or mean nothing).
RANGE_LIMITS_M = (1e-12, 1.0)
#: |SCAN_OFFSET| accepted, m.
MAX_OFFSET_M = 1.0
#: How far after ``:SCANIT_END:`` the ``\x1a\x04`` marker may start (real files: 3 bytes, ``\n\n\n``).
_MARKER_SEARCH = 64

_KEY_LINE = re.compile(r"^:([^\t:][^\t]*):$")
_DTYPES = {"MSBFIRST": ">f4", "LSBFIRST": "<f4"}
_DIRECTIONS = {"both": ("forward", "backward"), "forward": ("forward",), "backward": ("backward",)}
_CHUNK = 64 * 1024


# ----------------------------------------------------------------------------------- header
def _find_header_end(prefix: bytes, source: str) -> int | None:
    """Byte index of the first data byte (just after ``\\x1a\\x04``), or None if not yet written.

    Raises
    ------
    ScanFormatError
        The bytes cannot be the start of an .sxm file (wrong magic, a Nanonis .3ds grid, no end
        tag within :data:`MAX_HEADER_BYTES`, no ``\\x1a\\x04`` marker after the end tag).
    """
    head = prefix[: len(MAGIC)]
    if not MAGIC.startswith(head):
        if prefix.startswith(b"Grid dim="):
            raise ScanFormatError(source, "not a Nanonis .sxm scan: this is a Nanonis grid spectroscopy (.3ds) file")
        if prefix.startswith(b"Experiment\t") or prefix.startswith(b"[DATA]"):
            raise ScanFormatError(source, "not a Nanonis .sxm scan: this is a Nanonis spectrum (.dat) file")
        # never quote the bytes: the file may be a secret reached through a symlink (issue 15)
        raise ScanFormatError(source, "not a Nanonis .sxm scan: it does not start with ':NANONIS_VERSION:'")
    end = prefix.find(END_TAG, 0, MAX_HEADER_BYTES + len(END_TAG))
    if end < 0:
        if len(prefix) >= MAX_HEADER_BYTES:
            raise ScanFormatError(source, f"no ':SCANIT_END:' in the first {MAX_HEADER_BYTES} bytes (header too long or not an .sxm)")
        return None
    after = end + len(END_TAG)
    mark = prefix.find(MARKER, after, after + _MARKER_SEARCH)
    if mark < 0:
        tail = prefix[after : after + _MARKER_SEARCH]
        if len(tail) < _MARKER_SEARCH and tail.rstrip(b"\x1a").strip(b"\r\n \t") == b"":
            return None  # only line ends (and maybe half the marker) so far: the marker may follow
        raise ScanFormatError(source, "no \\x1a\\x04 data marker after ':SCANIT_END:'")
    if prefix[after:mark].strip(b"\r\n \t") != b"":
        raise ScanFormatError(source, "unexpected bytes between ':SCANIT_END:' and the \\x1a\\x04 data marker")
    return mark + len(MARKER)


def _decode(raw: bytes) -> str:
    """Header text: cp1252 (what Nanonis on Windows writes), Latin-1 for bytes cp1252 leaves undefined."""
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def parse_header(text: str) -> dict[str, str]:
    """Split header text into ``{KEY: value}`` (key without the colons, value lines joined by ``\\n``).

    Single-line values are stripped; multi-line values (COMMENT, tables) keep their inner lines,
    with trailing blank lines dropped. A repeated key keeps its first value.

    Parameters
    ----------
    text : str
        Decoded header up to (excluding) ``:SCANIT_END:``.
    """
    out: dict[str, str] = {}
    key: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if key is not None and key not in out:
            while lines and not lines[-1].strip():
                lines.pop()
            while lines and not lines[0].strip() and key not in ("Z-CONTROLLER", "DATA_INFO"):
                lines.pop(0)
            out[key] = lines[0].strip() if len(lines) == 1 else "\n".join(lines)

    for line in text.split("\n"):
        m = _KEY_LINE.match(line.rstrip())
        if m:
            flush()
            key, lines = m.group(1), []
        elif key is not None:
            lines.append(line)
    flush()
    return out


def _table(value: str) -> list[dict[str, str]]:
    """Rows of a tab-separated header table (first non-blank row = column names)."""
    rows = [ln.strip("\t ").split("\t") for ln in value.split("\n") if ln.strip()]
    if not rows:
        return []
    cols = [c.strip() for c in rows[0]]
    return [dict(zip(cols, (c.strip() for c in r))) for r in rows[1:]]


def _floats(header: dict[str, str], key: str, n: int, source: str, *, required: bool) -> tuple[float, ...] | None:
    """``n`` finite floats from a whitespace-separated header value."""
    raw = header.get(key)
    if raw is None:
        if required:
            raise ScanFormatError(source, f"header has no :{key}:")
        return None
    parts = raw.split()
    try:
        vals = tuple(float(p) for p in parts[:n])
    except ValueError:
        raise ScanFormatError(source, f":{key}: is not {n} number(s): {raw[:60]!r}") from None
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise ScanFormatError(source, f":{key}: is not {n} finite number(s): {raw[:60]!r}")
    return vals


def _opt_float(text: str | None) -> float | None:
    """A finite float, or None when absent/unparsable (for metadata that is not geometry)."""
    if text is None:
        return None
    try:
        v = float(text.split()[0])
    except (ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


class _Layout:
    """What the header says about the data block (sizes checked against the limits)."""

    def __init__(self, header: dict[str, str], source: str):
        stype = header.get("SCANIT_TYPE", "FLOAT MSBFIRST").split()
        if len(stype) != 2 or stype[0].upper() != "FLOAT" or stype[1].upper() not in _DTYPES:
            raise ScanFormatError(source, f"unsupported :SCANIT_TYPE: {' '.join(stype)!r} (expected FLOAT MSBFIRST/LSBFIRST)")
        self.dtype = _DTYPES[stype[1].upper()]

        raw = header.get("SCAN_PIXELS")
        if raw is None:
            raise ScanFormatError(source, "header has no :SCAN_PIXELS:")
        parts = raw.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ScanFormatError(source, f":SCAN_PIXELS: is not two positive integers: {raw[:60]!r}")
        nx, ny = (int(p) for p in parts)
        if not (0 < nx <= MAX_SIDE_PX and 0 < ny <= MAX_SIDE_PX):
            raise ScanFormatError(source, f":SCAN_PIXELS: {nx} x {ny} is outside 1..{MAX_SIDE_PX} pixels per side")
        self.nx, self.ny = nx, ny

        if "DATA_INFO" not in header:
            raise ScanFormatError(source, "header has no :DATA_INFO: channel table")
        rows = _table(header["DATA_INFO"])
        if not rows:
            raise ScanFormatError(source, ":DATA_INFO: lists no channel")
        self.channels: list[tuple[str, str, tuple[str, ...]]] = []  # (name, unit, directions)
        seen: set[str] = set()
        for i, row in enumerate(rows):
            name = row.get("Name", "").strip()
            direction = row.get("Direction", "").strip().lower()
            if not name or direction not in _DIRECTIONS:
                raise ScanFormatError(
                    source, f":DATA_INFO: row {i + 1} has no channel name or a bad Direction {direction!r} (expected both/forward/backward)"
                )
            if name in seen:
                raise ScanFormatError(source, f":DATA_INFO: channel {name!r} is listed twice")
            seen.add(name)
            self.channels.append((name, row.get("Unit", "").strip(), _DIRECTIONS[direction]))
        self.n_frames = sum(len(d) for _, _, d in self.channels)
        self.data_bytes = 4 * nx * ny * self.n_frames
        if self.data_bytes > MAX_DATA_BYTES:
            raise ScanFormatError(
                source,
                f"header promises {self.data_bytes} data bytes ({nx} x {ny} px x {self.n_frames} frames), "
                f"more than the {MAX_DATA_BYTES} accepted",
            )


def _header_and_layout(prefix: bytes, source: str) -> tuple[int, dict[str, str], _Layout] | None:
    """``(data start, header, layout)`` from the first bytes, or None while the header is incomplete."""
    start = _find_header_end(prefix, source)
    if start is None:
        return None
    end = prefix.find(END_TAG)
    header = parse_header(_decode(prefix[:end]))
    return start, header, _Layout(header, source)


def _typed(source: str, what: str, fn, *args):
    """Call ``fn``; an untyped parsing error becomes a ScanFormatError naming ``source``."""
    try:
        return fn(*args)
    except ScanFormatError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeError) as exc:  # defensive
        raise ScanFormatError(source, f"malformed {what} ({type(exc).__name__}: {exc})") from exc


def expected_size(prefix: bytes, *, name: str | None = None) -> int | None:
    """Total byte size the complete .sxm file must have, from its first bytes.

    Parameters
    ----------
    prefix : bytes
        The first bytes of a file that may still be being written (any length, may be empty).
    name : str, optional
        Label for errors.

    Returns
    -------
    int | None
        ``header length (incl. the \\x1a\\x04 marker) + 4 * nx * ny * n_frames``, or None while the
        header is incomplete.

    Raises
    ------
    ScanFormatError
        The header is complete (or cannot become valid) but is invalid: not an .sxm, no
        SCAN_PIXELS/DATA_INFO, absurd sizes.
    """
    source = name or "<bytes>"
    got = _typed(source, "header", _header_and_layout, bytes(prefix), source)
    if got is None:
        return None
    start, _, layout = got
    return start + layout.data_bytes


def read_header_prefix(fd: int) -> bytes:
    """Read from the open file ``fd`` just enough to cover the header (at most MAX_HEADER_BYTES + a
    little; stops at once when the first bytes are not the .sxm magic).

    Raises
    ------
    OSError
        The read failed.
    """
    buf = bytearray()
    while len(buf) <= MAX_HEADER_BYTES + _MARKER_SEARCH:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        buf += chunk
        end = buf.find(END_TAG, max(0, len(buf) - len(chunk) - len(END_TAG)))
        if (end >= 0 and len(buf) >= end + len(END_TAG) + _MARKER_SEARCH) or not MAGIC.startswith(bytes(buf[: len(MAGIC)])):
            break
    return bytes(buf)


def _open(path: Path, roots: Roots | None) -> tuple[int, os.stat_result]:
    """:func:`adapters.files.open_regular` with the reader's errors (ScanFormatError for every refusal)."""
    try:
        return open_regular(path, roots, MAX_FILE_BYTES)
    except RefusedPathError as exc:
        raise ScanFormatError(path, exc.reason) from exc
    except FileNotFoundError as exc:
        raise ScanFormatError(path, f"cannot read the file ({exc.strerror or exc})") from exc


def expected_file_size(path: str | Path, roots: Roots | None = None) -> int | None:
    """:func:`expected_size` of a file on disk, reading only its header (opened safely, bounded).

    Parameters
    ----------
    path : str | Path
    roots : Roots, optional
        Folders the file must resolve into (:class:`adapters.files.Roots`).

    Raises
    ------
    ScanFormatError
        As :func:`expected_size`; or the file does not exist or cannot be opened, is not a regular file (FIFO,
        device), lies outside ``roots`` or is larger than :data:`MAX_FILE_BYTES`.
    """
    path = Path(path)
    fd, _ = _open(path, roots)
    try:
        prefix = read_header_prefix(fd)
    except OSError as exc:
        raise ScanFormatError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    return expected_size(prefix, name=str(path))


# ----------------------------------------------------------------------------------- reading
def _parse_datetime(date: str | None, time: str | None) -> datetime | None:
    if not date:
        return None
    try:
        day = datetime.strptime(date.strip(), "%d.%m.%Y")
        if time:
            t = datetime.strptime(time.strip(), "%H:%M:%S")
            day = day.replace(hour=t.hour, minute=t.minute, second=t.second)
    except ValueError:
        return None
    return day


def _setpoint_A(header: dict[str, str]) -> float | None:
    """Z-controller setpoint in A (None if the controller regulates on another quantity, e.g. Hz)."""
    rows = _table(header.get("Z-CONTROLLER", ""))
    if rows and rows[0].get("Setpoint"):
        parts = rows[0]["Setpoint"].split()
        return _opt_float(parts[0]) if len(parts) == 2 and parts[1] == "A" else None
    if header.get("Z-Controller>Setpoint unit", "").strip() == "A":
        return _opt_float(header.get("Z-Controller>Setpoint"))
    return None


def _parsed(data: bytes, source: str) -> tuple[int, dict[str, str], _Layout]:
    """The header of complete file bytes (ScanFormatError while it is incomplete)."""
    got = _header_and_layout(data, source)
    if got is None:
        if data.find(END_TAG) < 0:
            raise ScanFormatError(source, f"truncated or not an .sxm: no ':SCANIT_END:' in its {len(data)} bytes")
        raise ScanFormatError(source, "truncated: the file ends inside the header (no \\x1a\\x04 data marker)")
    return got


def _check_size(have: int, layout: _Layout, source: str) -> None:
    """ScanFormatError unless the data block has exactly the bytes the header promises."""
    if have != layout.data_bytes:
        if have == 0:
            why = "header only, no data"
        elif have < layout.data_bytes:
            why = f"truncated: data block has {have} bytes, {layout.data_bytes - have} fewer than"
        else:
            why = f"data block has {have} bytes, {have - layout.data_bytes} more than"
        if have == 0:
            raise ScanFormatError(source, f"{why} (header promises {layout.data_bytes} bytes)")
        raise ScanFormatError(
            source,
            f"{why} the {layout.data_bytes} the header promises "
            f"({layout.nx} x {layout.ny} px x {layout.n_frames} frames x 4 bytes)",
        )


def _load(data: bytes, source: str, frame_id: str,
          parsed: tuple[int, dict[str, str], _Layout] | None = None) -> Scan:
    start, header, layout = parsed if parsed is not None else _parsed(data, source)
    _check_size(len(data) - start, layout, source)

    rng = _floats(header, "SCAN_RANGE", 2, source, required=True)
    assert rng is not None
    lo, hi = RANGE_LIMITS_M
    if not (rng[0] > 0 and rng[1] > 0):
        raise ScanFormatError(source, f":SCAN_RANGE: must be positive, got {rng}")
    if not all(lo <= r <= hi for r in rng):
        raise ScanFormatError(source, f":SCAN_RANGE: {rng[0]:g} x {rng[1]:g} m is outside {lo:g}..{hi:g} m per side")
    off = _floats(header, "SCAN_OFFSET", 2, source, required=False) or (0.0, 0.0)
    if not all(abs(o) <= MAX_OFFSET_M for o in off):
        raise ScanFormatError(source, f":SCAN_OFFSET: {off[0]:g}, {off[1]:g} m is beyond +-{MAX_OFFSET_M:g} m")
    ang = _floats(header, "SCAN_ANGLE", 1, source, required=False) or (0.0,)
    sdir = header.get("SCAN_DIR", "").strip().lower()
    direction = sdir if sdir in ("up", "down") else "unknown"

    nx, ny = layout.nx, layout.ny
    block = np.frombuffer(data, dtype=layout.dtype, count=layout.n_frames * ny * nx, offset=start)
    block = block.reshape(layout.n_frames, ny, nx)
    channels: dict[str, dict[str, np.ndarray]] = {}
    units: dict[str, str] = {}
    k = 0
    for name, unit, dirs in layout.channels:
        frames: dict[str, np.ndarray] = {}
        for d in dirs:
            a = block[k]
            k += 1
            if direction == "up":
                a = a[::-1]
            if d == "backward":
                a = a[:, ::-1]
            frames[d] = np.ascontiguousarray(a, dtype=np.float32)  # one copy: native float32
        channels[name] = frames
        units[name] = unit

    main = channels["Z"] if "Z" in channels else next(iter(channels.values()))
    valid = np.zeros(ny, dtype=bool)
    for a in main.values():
        valid |= np.isfinite(a).any(axis=1)
    if not valid.any():
        raise EmptyScanError(source, "no acquired lines (every row of the main channel is NaN)")

    bias = _opt_float(header.get("BIAS"))
    if bias is None:
        bias = _opt_float(header.get("Bias>Bias (V)"))
    return Scan(
        source=source,
        frame_id=frame_id,
        channels=channels,
        units=units,
        range_nm=(rng[0] * 1e9, rng[1] * 1e9),
        offset_nm=(off[0] * 1e9, off[1] * 1e9),
        angle_deg=float(ang[0]),
        scan_direction=direction,  # type: ignore[arg-type]
        bias_V=bias,
        setpoint_A=_setpoint_A(header),
        acquired_at=_parse_datetime(header.get("REC_DATE"), header.get("REC_TIME")),
        acquisition_time_s=_opt_float(header.get("ACQ_TIME")),
        comment=header.get("COMMENT", "").strip("\n"),
        valid_rows=valid,
        header=header,
    )


def read_sxm(source: str | Path | bytes, *, name: str | None = None, roots: Roots | None = None,
             frame_id: str | None = None) -> Scan:
    """Read a Nanonis .sxm scan into a :class:`agent.domain.Scan`.

    A file is opened safely (:func:`adapters.files.open_regular`: regular files only, inside
    ``roots`` when given, no symlink swapped in) and its header is read and checked first: a file
    that is not an .sxm, or whose size differs from what its header promises, is refused before
    the rest is read. The bytes are read once, hashed once and the header parsed once; the data block is viewed with ``np.frombuffer`` and each frame copied once to native
    float32 in display orientation (row 0 = top: up scans flipped vertically; backward frames
    un-mirrored with ``fliplr``).

    Parameters
    ----------
    source : str | Path | bytes
        Path of the file, or its raw bytes (e.g. from the ZeroMQ controller feed).
    name : str, optional
        Label of bytes input in errors and ``Scan.source`` (default ``"<bytes>"``); ignored for paths.
    roots : Roots, optional
        Folders a path must resolve into (symlinks leading out are refused); None = any path.
    frame_id : str, optional
        The sha256 of bytes input when the caller already has it (not hashed again).

    Returns
    -------
    Scan
        Channels ``{name: {"forward"|"backward": (ny, nx) float32}}`` in SI units (DATA_INFO Unit
        column), only the directions DATA_INFO lists; ``frame_id`` = sha256 hex of the bytes;
        ``range_nm``/``offset_nm`` in nm; ``angle_deg``; ``bias_V`` (V); ``setpoint_A`` (A, None if
        the Z controller's setpoint is not a current); ``valid_rows`` (bool (ny,), rows with any
        finite value in the main channel: ``Z``, else the first channel).

    Raises
    ------
    ScanFormatError
        Unreadable file, not a regular file, outside ``roots``, not an .sxm, truncated /
        over-long data block, invalid or implausible header (message names the file and the
        reason, never quotes its content).
    EmptyScanError
        Well-formed scan without any acquired line (subclass of ScanFormatError).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<bytes>"
        parsed = None
    else:
        label = str(source)
        data, parsed = _read_file(Path(source), roots)
    if frame_id is None:
        frame_id = hashlib.sha256(data).hexdigest()
    return _typed(label, "file", _load, data, label, frame_id, parsed)


def _read_file(path: Path, roots: Roots | None) -> tuple[bytes, tuple[int, dict[str, str], _Layout] | None]:
    """The bytes of an .sxm file, header first: nothing more is read unless the header is valid and
    the file's size is the one it promises. Returns the bytes and the parsed header."""
    label = str(path)
    fd, st = _open(path, roots)
    try:
        prefix = read_header_prefix(fd)
        parsed = _typed(label, "header", _header_and_layout, prefix, label)
        if parsed is None:
            return prefix, None  # the file ends inside its header: _load says why
        start, _, layout = parsed
        _check_size(st.st_size - start, layout, label)
        want = start + layout.data_bytes
        chunks, n = [prefix], len(prefix)
        while n < want:
            chunk = os.read(fd, min(want - n, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        data = b"".join(chunks)
        if os.read(fd, 1):
            raise ScanFormatError(label, "the file grew while it was read (still being written?)")
        return data, parsed
    except OSError as exc:
        raise ScanFormatError(label, f"cannot read the file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
