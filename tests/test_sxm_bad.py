"""adapters.sxm on broken input: every file in ../shared/data/sxm/bad, and damaged real files."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stm_agent.adapters.sxm import expected_file_size, expected_size, read_sxm
from stm_agent.agent.errors import EmptyScanError, ScanFormatError

BAD = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sxm" / "bad").resolve()
BAD_FILES = sorted(p.name for p in BAD.glob("*")) or ["<no files in ../shared/data/sxm/bad>"]

# reason expected per kind of damage (file name prefix), from SOURCES.md
REASON = {
    "short": r"truncated: data block has \d+ bytes, \d+ fewer than",
    "truncated": r"truncated: data block has \d+ bytes",
    "header_only": r"header only, no data",
    "grid_3ds": r"grid spectroscopy \(\.3ds\)",
    "not_an_sxm": r"not a Nanonis \.sxm scan",
}
# intact originals of the damaged files (SOURCES.md): expected_file_size must give their size
INTACT = {
    "short2bytes_porphyrin_brstm_112_down.sxm": "porphyrin_brstm_112_down_nan52pct.sxm",
    "short5bytes_porphyrin_pair_128_up.sxm": "porphyrin_pair_128_up_nan51pct.sxm",
    "short23bytes_porphyrin_dimer_96_up_7ch.sxm": "porphyrin_dimer_96_up_7ch.sxm",
    "truncated_porphyrin_dimer_96_up_7ch.sxm": "porphyrin_dimer_96_up_7ch.sxm",
    "header_only_porphyrin_pair_128_down_10ch.sxm": "porphyrin_pair_128_down_10ch_nan51pct.sxm",
}


def _bad(sxm_dir: Path, name: str) -> Path:
    path = sxm_dir / "bad" / name
    assert path.is_file(), f"missing negative case {path} (see ../shared/data/SOURCES.md)"
    return path


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_raises_typed_error_naming_file_and_reason(sxm_dir: Path, name: str) -> None:
    path = _bad(sxm_dir, name)
    pattern = next(v for k, v in REASON.items() if name.startswith(k))
    with pytest.raises(ScanFormatError) as err:
        read_sxm(path)
    assert not isinstance(err.value, EmptyScanError)
    assert err.value.source == str(path) and name in str(err.value)
    assert re.search(pattern, err.value.reason), err.value.reason
    # the same from the raw bytes, labelled by name
    with pytest.raises(ScanFormatError, match=re.escape("zmq:" + name) + ": .*" + pattern):
        read_sxm(path.read_bytes(), name="zmq:" + name)


@pytest.mark.parametrize("name", sorted(INTACT))
def test_expected_size_of_damaged_file_is_the_intact_size(sxm_dir: Path, name: str) -> None:
    path = _bad(sxm_dir, name)
    intact = (sxm_dir / INTACT[name]).stat().st_size
    assert expected_file_size(path) == intact
    assert path.stat().st_size < intact  # so a watcher keeps waiting instead of reading it


@pytest.mark.parametrize("name", ["grid_3ds_misnamed.sxm", "not_an_sxm.sxm"])
def test_expected_size_rejects_non_sxm(sxm_dir: Path, name: str) -> None:
    path = _bad(sxm_dir, name)
    with pytest.raises(ScanFormatError, match=re.escape(name)):
        expected_file_size(path)
    with pytest.raises(ScanFormatError):
        expected_size(path.read_bytes()[:40])


def _real(sxm_dir: Path, name: str = "porphyrin_dimer_96_up_7ch.sxm") -> bytes:
    path = sxm_dir / name
    assert path.is_file(), f"missing real scan {path}"
    return path.read_bytes()


def _set(b: bytes, key: bytes, value: bytes) -> bytes:
    """Replace the value line of a header key."""
    out, n = re.subn(rb"(:" + re.escape(key) + rb":\n)[^\n]*\n", lambda m: m.group(1) + value + b"\n", b, count=1)
    assert n == 1
    return out


def _delete(b: bytes, key: bytes) -> bytes:
    """Delete a header key and its value lines."""
    out, n = re.subn(rb":" + re.escape(key) + rb":\n(?:(?!:[^\n\t]*:\n)[^\n]*\n)*", b"", b, count=1)
    assert n == 1
    return out


@pytest.mark.parametrize("pixels", [b"1000000000 1000000000", b"65537 2", b"20000 20000"])
def test_absurd_scan_pixels_rejected_before_allocating(sxm_dir: Path, pixels: bytes) -> None:
    b = _set(_real(sxm_dir), b"SCAN_PIXELS", pixels)
    tracemalloc.start()
    try:
        with pytest.raises(ScanFormatError, match=r"x\.sxm: .*(SCAN_PIXELS|header promises)"):
            read_sxm(b, name="x.sxm")
        with pytest.raises(ScanFormatError, match="SCAN_PIXELS|data bytes"):
            expected_size(b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # a few copies of the 0.5 MB file at most, never the promised size


def test_20000_square_is_allowed_by_expected_size_but_not_by_the_file(sxm_dir: Path) -> None:
    """Within the limits, a header whose size disagrees with the file is a truncation, not a crash."""
    b = _set(_real(sxm_dir), b"SCAN_PIXELS", b"97 96")
    assert expected_size(b) == len(b) + 14 * 96 * 4
    with pytest.raises(ScanFormatError, match="fewer than"):
        read_sxm(b, name="x.sxm")


@pytest.mark.parametrize(
    "key, reason",
    [(b"SCAN_PIXELS", "no :SCAN_PIXELS:"), (b"DATA_INFO", "no :DATA_INFO:"), (b"SCAN_RANGE", "no :SCAN_RANGE:")],
)
def test_missing_required_key(sxm_dir: Path, key: bytes, reason: str) -> None:
    b = _delete(_real(sxm_dir), key)
    with pytest.raises(ScanFormatError, match=re.escape("x.sxm: ") + ".*" + re.escape(reason)):
        read_sxm(b, name="x.sxm")


@pytest.mark.parametrize(
    "key, value, reason",
    [
        (b"SCAN_PIXELS", b"96", "not two positive integers"),
        (b"SCAN_PIXELS", b"-96 96", "not two positive integers"),
        (b"SCAN_PIXELS", b"0 96", "outside"),
        (b"SCAN_RANGE", b"5E-9 nan", "finite"),
        (b"SCAN_RANGE", b"0 5E-9", "positive"),
        (b"SCAN_ANGLE", b"abc", "SCAN_ANGLE"),
        (b"SCANIT_TYPE", b"INT MSBFIRST", "SCANIT_TYPE"),
    ],
)
def test_invalid_geometry_is_an_error(sxm_dir: Path, key: bytes, value: bytes, reason: str) -> None:
    with pytest.raises(ScanFormatError, match=reason):
        read_sxm(_set(_real(sxm_dir), key, value), name="x.sxm")


def test_optional_metadata_may_be_missing(sxm_dir: Path) -> None:
    b = _real(sxm_dir)
    for key in (b"BIAS", b"REC_DATE", b"ACQ_TIME", b"COMMENT", b"SCAN_OFFSET", b"SCAN_ANGLE", b"SCAN_DIR"):
        b = _delete(b, key)
    b = _set(b, b"Bias>Bias (V)", b"garbage")
    scan = read_sxm(b, name="x.sxm")
    assert scan.bias_V is None and scan.acquired_at is None and scan.acquisition_time_s is None
    assert scan.offset_nm == (0.0, 0.0) and scan.angle_deg == 0.0 and scan.scan_direction == "unknown"
    assert scan.setpoint_A == pytest.approx(1e-10)


def test_direction_column_is_honoured(sxm_dir: Path) -> None:
    """A channel recorded forward only: its backward frame is absent from the file and the Scan."""
    b = _real(sxm_dir)
    start = b.index(b"\x1a\x04") + 2
    full = read_sxm(b, name="full.sxm")
    head = b[:start].replace(b"\tCurrent\tA\tboth\t", b"\tCurrent\tA\tforward\t")
    head = head.replace(b"\tCounter_1\tHz\tboth\t", b"\tCounter_1\tHz\tbackward\t")
    frames = np.frombuffer(b, np.uint8, offset=start).reshape(14, -1)
    keep = [i for i in range(14) if i not in (3, 12)]  # Current backward, Counter_1 forward
    scan = read_sxm(head + frames[keep].tobytes(), name="onedir.sxm")
    assert set(scan.channels["Current"]) == {"forward"} and set(scan.channels["Counter_1"]) == {"backward"}
    for ch, dirs in scan.channels.items():
        for d, a in dirs.items():
            np.testing.assert_array_equal(a, full.channels[ch][d])
    assert expected_size(head + frames[keep].tobytes()) == len(head) + 12 * frames.shape[1]


def test_extra_bytes_and_bad_direction_are_errors(sxm_dir: Path) -> None:
    b = _real(sxm_dir)
    with pytest.raises(ScanFormatError, match="4 more than"):
        read_sxm(b + b"\0\0\0\0", name="x.sxm")
    with pytest.raises(ScanFormatError, match="bad Direction"):
        read_sxm(b.replace(b"\tZ\tm\tboth\t", b"\tZ\tm\tsideways\t"), name="x.sxm")
    with pytest.raises(ScanFormatError, match="listed twice"):
        read_sxm(b.replace(b"\tCurrent\tA\t", b"\tZ\tA\t"), name="x.sxm")


def test_missing_file_and_empty_bytes(tmp_path: Path) -> None:
    with pytest.raises(ScanFormatError, match="cannot read the file"):
        read_sxm(tmp_path / "nope.sxm")
    with pytest.raises(ScanFormatError, match="cannot read the file"):
        expected_file_size(tmp_path / "nope.sxm")
    with pytest.raises(ScanFormatError, match="no ':SCANIT_END:'"):
        read_sxm(b"", name="empty.sxm")
    assert expected_size(b"") is None and expected_size(b":NANONIS_VER") is None
