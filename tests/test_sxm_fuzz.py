"""Property test: damaged real .sxm files never raise anything but ScanFormatError, never allocate much.

Mutations of real scans: truncation anywhere, byte flips in the header and in the data, deletion of
a header key, absurd SCAN_PIXELS, random bytes inserted into the header. Bounded to ~100
examples; scripts/fuzz_sxm.py runs the same idea for minutes.
"""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stm_agent.adapters.sxm import expected_size, read_sxm
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import ScanFormatError

FILES = ["porphyrin_dimer_96_up_7ch.sxm", "createc_converted_256x9_down.sxm", "hbn_point_defect_96x100_down.sxm"]
_KEY = re.compile(rb"^:[^\n\t]*:\n", re.M)


@pytest.fixture(scope="module")
def originals(sxm_dir: Path) -> list[bytes]:
    out = []
    for name in FILES:
        path = sxm_dir / name
        assert path.is_file(), f"missing real scan {path}"
        out.append(path.read_bytes())
    return out


def _mutate(b: bytes, kind: str, a: int, c: int, junk: bytes) -> bytes:
    """Apply one mutation; ``a``/``c`` are free integers mapped into the file, ``junk`` raw bytes."""
    head_end = b.index(b"\x1a\x04") + 2
    if kind == "truncate":
        return b[: a % len(b)]
    if kind == "flip_header":
        i = a % head_end
        return b[:i] + bytes([b[i] ^ (1 + c % 255)]) + b[i + 1 :]
    if kind == "flip_data":
        i = head_end + a % (len(b) - head_end)
        return b[:i] + bytes([b[i] ^ (1 + c % 255)]) + b[i + 1 :]
    if kind == "delete_key":
        keys = list(_KEY.finditer(b, 0, head_end))
        m = keys[a % len(keys)]
        nxt = keys[(a % len(keys)) + 1].start() if (a % len(keys)) + 1 < len(keys) else b.index(b":SCANIT_END:")
        return b[: m.start()] + b[nxt:]
    if kind == "pixels":
        return re.sub(rb"(:SCAN_PIXELS:\n)[^\n]*", lambda m: m.group(1) + b"%d %d" % (a, c), b, count=1)
    if kind == "insert":
        i = a % head_end
        return b[:i] + junk + b[i:]
    raise AssertionError(kind)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(FILES) - 1),
    kind=st.sampled_from(["truncate", "flip_header", "flip_data", "delete_key", "pixels", "insert"]),
    a=st.one_of(st.integers(0, 10**7), st.sampled_from([10**9, 2**31, 2**40, 65536, 65537])),
    c=st.one_of(st.integers(0, 10**7), st.sampled_from([10**9, 2**31, 2**40, 0])),
    junk=st.binary(min_size=1, max_size=40),
)
def test_only_scan_format_errors_escape(originals: list[bytes], which: int, kind: str, a: int, c: int, junk: bytes) -> None:
    data = _mutate(originals[which], kind, a, c, junk)
    tracemalloc.start()
    try:
        try:
            size = expected_size(data)
            assert size is None or size > 0
        except ScanFormatError as exc:
            assert exc.source == "<bytes>" and exc.reason
        try:
            scan = read_sxm(data, name="fuzz.sxm")
            assert isinstance(scan, Scan) and scan.valid_rows is not None and scan.valid_rows.any()
            assert len(data) == expected_size(data)
        except ScanFormatError as exc:
            assert str(exc).startswith("fuzz.sxm: ") and exc.reason
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(data) + 2**20, peak  # bounded by the input, whatever the header claims
