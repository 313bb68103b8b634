"""adapters.sxm on every real scan in ../shared/data/sxm: header fields, data layout, orientation.

Expected values come from the raw header text, parsed here independently with regular
expressions, from the stored data block decoded here with numpy, and from SOURCES.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from stm_agent.adapters.sxm import expected_file_size, expected_size, read_sxm
from stm_agent.agent.errors import EmptyScanError

SXM = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sxm").resolve()
GOOD = sorted(p.name for p in SXM.glob("*.sxm")) or ["<no .sxm files in ../shared/data/sxm>"]


# ------------------------------------------------------------------ independent raw-header parsing
def _raw(path: Path) -> tuple[bytes, str, int]:
    """File bytes, header text (Latin-1, NULs removed) and the index of the first data byte."""
    b = path.read_bytes()
    end = b.index(b":SCANIT_END:")
    start = b.index(b"\x1a\x04", end) + 2
    return b, b[:end].decode("latin-1").replace("\x00", ""), start


def _section(text: str, key: str) -> str | None:
    m = re.search(r"^:" + re.escape(key) + r":\n(.*?)(?=^:[^\t\n]*:$|\Z)", text, re.M | re.S)
    return None if m is None else m.group(1)


def _nums(text: str, key: str) -> list[float]:
    return [float(v) for v in _section(text, key).split()]


def _data_info(text: str) -> list[tuple[str, str, str]]:
    """(name, unit, direction) per DATA_INFO row."""
    return re.findall(r"^\t\d+\t([^\t]+)\t([^\t]*)\t(\w+)\t", _section(text, "DATA_INFO"), re.M)


def _file(sxm_dir: Path, name: str) -> Path:
    path = sxm_dir / name
    assert path.is_file(), f"missing real scan {path} (see ../shared/data/SOURCES.md)"
    return path


@pytest.mark.parametrize("name", GOOD)
def test_header_and_data_match_the_raw_file(sxm_dir: Path, name: str) -> None:
    path = _file(sxm_dir, name)
    b, text, start = _raw(path)
    nx, ny = (int(v) for v in _section(text, "SCAN_PIXELS").split())
    info = _data_info(text)
    n_frames = sum(2 if d == "both" else 1 for _, _, d in info)
    stored = np.frombuffer(b, ">f4", offset=start).reshape(n_frames, ny, nx)
    direction = _section(text, "SCAN_DIR").strip()

    if not np.isfinite(stored[0]).any():  # the aborted scan: nothing acquired
        with pytest.raises(EmptyScanError, match=re.escape(name) + ".*no acquired lines"):
            read_sxm(path)
        assert expected_file_size(path) == len(b)
        return

    scan = read_sxm(path)
    assert scan.source == str(path)
    assert scan.frame_id == hashlib.sha256(b).hexdigest()
    assert scan.pixels == (nx, ny) and scan.shape == (ny, nx)
    rx, ry = _nums(text, "SCAN_RANGE")
    assert scan.range_nm == pytest.approx((rx * 1e9, ry * 1e9), rel=1e-9)
    assert scan.pixel_size_nm == pytest.approx((rx * 1e9 / nx, ry * 1e9 / ny), rel=1e-9)
    ox, oy = _nums(text, "SCAN_OFFSET")
    assert scan.offset_nm == pytest.approx((ox * 1e9, oy * 1e9), rel=1e-9, abs=1e-12)
    assert scan.angle_deg == pytest.approx(_nums(text, "SCAN_ANGLE")[0])
    assert scan.scan_direction == direction
    assert list(scan.channels) == [n for n, _, _ in info]
    assert 2 <= len(scan.channels) <= 10
    for (ch, unit, d) in info:
        assert scan.units[ch] == unit
        want = {"forward", "backward"} if d == "both" else {d}
        assert set(scan.channels[ch]) == want
        for a in scan.channels[ch].values():
            assert a.dtype == np.float32 and a.shape == (ny, nx) and a.flags.c_contiguous
    assert scan.bias_V == pytest.approx(_nums(text, "BIAS")[0])
    sp = re.search(r"^\t[^\t\n]*\t[^\t\n]*\t(\S+) (\S+)\t", _section(text, "Z-CONTROLLER").split("\n", 2)[1] + "\t", re.M)
    assert sp.group(2) == "A" and scan.setpoint_A == pytest.approx(float(sp.group(1)))
    assert scan.acquisition_time_s == pytest.approx(_nums(text, "ACQ_TIME")[0])
    when = datetime.strptime(_section(text, "REC_DATE").strip() + " " + _section(text, "REC_TIME").strip(), "%d.%m.%Y %H:%M:%S")
    assert scan.acquired_at == when
    assert scan.comment.split() == _section(text, "COMMENT").split()
    assert scan.header["SCAN_PIXELS"].split() == [str(nx), str(ny)]

    # data: first channel, forward and backward, against the stored frames oriented here
    first = info[0][0]
    fwd, bwd = stored[0].astype(np.float32), stored[1].astype(np.float32)
    if direction == "up":
        fwd, bwd = fwd[::-1], bwd[::-1]
    np.testing.assert_array_equal(scan.frame(first, "forward"), fwd)
    np.testing.assert_array_equal(scan.frame(first, "backward"), bwd[:, ::-1])
    # last channel's last frame: checks the channel order and frame count
    last = info[-1][0]
    lastd = "backward" if info[-1][2] == "both" else info[-1][2]
    want = stored[-1][::-1] if direction == "up" else stored[-1]
    np.testing.assert_array_equal(scan.frame(last, lastd), want[:, ::-1] if lastd == "backward" else want)

    # valid rows: rows of the main channel with any finite value, display orientation
    main = "Z" if "Z" in scan.channels else first
    rows = np.zeros(ny, bool)
    for a in scan.channels[main].values():
        rows |= np.isfinite(a).any(axis=1)
    np.testing.assert_array_equal(scan.valid_rows, rows)

    # expected sizes: the whole file, from any prefix that covers the header
    assert expected_size(b) == len(b)
    assert expected_size(b[:start]) == len(b)
    assert expected_file_size(path) == len(b)
    for k in (0, 5, 17, text.index(":SCAN_PIXELS:") + 3, b.index(b":SCANIT_END:") + 12, start - 1):
        assert expected_size(b[:k]) is None, k


# Spot values from SOURCES.md (pixels nx x ny, range in nm, number of channels, direction).
SPOT = {
    "createc_converted_512x60_down.sxm": ((512, 60), (200.2, 200.2), 2, "down"),
    "createc_converted_256x9_down.sxm": ((256, 9), (99.85, 99.85), 2, "down"),
    "au111_molecule_chain_afm_96x192_up_angle59.sxm": ((96, 192), (2, 4), 9, "up"),
    "au111_molecule_afm_160x80_up.sxm": ((160, 80), (4.6, 2.3), 9, "up"),
    "hbn_100nm_144x168_down_nan85pct.sxm": ((144, 168), (100, 100), 4, "down"),
    "porphyrin_pair_128_down_10ch_nan51pct.sxm": ((128, 128), (3.5, 3.5), 10, "down"),
    "pyspm_large_5um_256_up.sxm": ((256, 256), (5000, 5000), 2, "up"),
}


@pytest.mark.parametrize("name", sorted(SPOT))
def test_spot_values_from_sources_md(sxm_dir: Path, name: str) -> None:
    pixels, rng, n_ch, direction = SPOT[name]
    scan = read_sxm(_file(sxm_dir, name))
    assert scan.pixels == pixels
    assert scan.range_nm == pytest.approx(rng, rel=2e-3)
    assert len(scan.channels) == n_ch and scan.scan_direction == direction


# NaN table of SOURCES.md: (NaN fraction of the first frame, whole NaN rows, stored first?).
NAN_TABLE = {
    "porphyrin_pair_128_up_nan51pct.sxm": (0.508, 65, True),
    "porphyrin_pair_128_down_nan51pct.sxm": (0.508, 65, False),
    "porphyrin_pair_128_down_10ch_nan51pct.sxm": (0.508, 65, False),
    "porphyrin_brstm_112_down_nan52pct.sxm": (0.522, 58, False),
    "porphyrin_dimer_96_up_partial16pct.sxm": (0.156, 15, False),
    "hbn_100nm_144x168_down_nan85pct.sxm": (0.851, 143, False),
    "porphyrin_dimer_96_up_7ch.sxm": (0.0, 0, False),
}


@pytest.mark.parametrize("name", sorted(NAN_TABLE))
def test_incomplete_scans_valid_rows(sxm_dir: Path, name: str) -> None:
    frac, n_nan, stored_first = NAN_TABLE[name]
    scan = read_sxm(_file(sxm_dir, name))
    ny = scan.shape[0]
    first = next(iter(scan.channels))
    assert np.isnan(scan.frame(first, "forward")).mean() == pytest.approx(frac, abs=1e-3)
    assert scan.acquired_lines == ny - n_nan
    assert scan.completeness == pytest.approx((ny - n_nan) / ny)
    # display orientation: stored-first padding of an up scan and stored-last padding of a down
    # scan end up at the bottom (rows acquired at the top); the up scan with padding stored last
    # has its missing rows at the top.
    flipped = scan.scan_direction == "up"
    nan_at_bottom = stored_first == flipped
    want = np.ones(ny, bool)
    if n_nan:
        want[ny - n_nan :] = False if nan_at_bottom else True
        if not nan_at_bottom:
            want[:n_nan] = False
    np.testing.assert_array_equal(scan.valid_rows, want)


def test_all_nan_scan_is_empty(sxm_dir: Path) -> None:
    path = _file(sxm_dir, "aborted_all_nan_240x96_up_angle31.sxm")
    with pytest.raises(EmptyScanError) as err:
        read_sxm(path)
    assert err.value.source == str(path) and "no acquired lines" in err.value.reason


# ------------------------------------------------------------------------------ orientation
def _flat(a: np.ndarray) -> np.ndarray:
    """Plane + row-median removal over the finite pixels (float64)."""
    a = a.astype(np.float64)
    ny, nx = a.shape
    yy, xx = np.mgrid[:ny, :nx]
    m = np.isfinite(a)
    coef, *_ = np.linalg.lstsq(np.c_[xx[m], yy[m], np.ones(m.sum())], a[m], rcond=None)
    r = a - (coef[0] * xx + coef[1] * yy + coef[2])
    rows = np.isfinite(r).any(axis=1)
    r[rows] -= np.nanmedian(r[rows], axis=1, keepdims=True)
    return r


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    m = np.isfinite(a) & np.isfinite(b)
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def _signal_channel(scan) -> str:
    """Z in constant current (Z-controller on), Current in constant height (controller off)."""
    row = scan.header["Z-CONTROLLER"].strip("\n").split("\n")[1].strip("\t").split("\t")
    return "Z" if row[1].strip() == "1" else "Current"


MIRROR_FILES = [
    "au111_adsorbates_10nm_256_up.sxm", "cu111_tcne_molecules_4nm_256_up.sxm", "cu111_tcne_steps_50nm_256_up.sxm",
    "graphene_tcne_monolayer_4nm_256_down.sxm", "hbn_100nm_144x168_down_nan85pct.sxm", "hbn_point_defect_96x100_down.sxm",
    "porphyrin_dimer_96_up_7ch.sxm", "si111_7x7_steps_200nm_256_down.sxm", "generic45_lattice_defects_256_down.sxm",
    "au111_molecule_afm_160x80_up.sxm", "au111_molecule_chain_afm_96x192_up_angle59.sxm", "generic4_afm_128_up_9ch.sxm",
    "generic5_au_molecule_256_down_angle135.sxm", "porphyrin_pair_128_up_nan51pct.sxm", "porphyrin_brstm_112_down_nan52pct.sxm",
]


@pytest.mark.parametrize("name", MIRROR_FILES)
def test_backward_unmirrored_overlays_forward(sxm_dir: Path, name: str) -> None:
    scan = read_sxm(_file(sxm_dir, name))
    ch = _signal_channel(scan)
    fwd, bwd = _flat(scan.frame(ch, "forward")), _flat(scan.frame(ch, "backward"))
    same = _corr(fwd, bwd)
    mirrored = _corr(fwd, bwd[:, ::-1])
    assert same > 0.9, (ch, same)
    assert same > mirrored + 0.15, (ch, same, mirrored)


def test_up_and_down_scan_of_the_same_area_agree(sxm_dir: Path) -> None:
    """The porphyrin pair: same offset/range/angle, up scan and two down scans, 63 lines each."""
    up = read_sxm(_file(sxm_dir, "porphyrin_pair_128_up_nan51pct.sxm"))
    # the 10-channel scan was taken 44 min after the up scan: ~3 px drift and a changed tip
    for other, floor in (("porphyrin_pair_128_down_nan51pct.sxm", 0.95), ("porphyrin_pair_128_down_10ch_nan51pct.sxm", 0.65)):
        down = read_sxm(_file(sxm_dir, other))
        assert (up.offset_nm, up.range_nm, up.angle_deg) == (down.offset_nm, down.range_nm, down.angle_deg)
        np.testing.assert_array_equal(up.valid_rows, down.valid_rows)
        a, b = _flat(up.frame("Current")), _flat(down.frame("Current"))
        n = int(up.valid_rows.sum())
        same = _corr(a, b)
        assert same > floor
        # upside down within the acquired band (the other vertical convention) matches far worse
        assert same > _corr(a[:n][::-1], b[:n]) + 0.2
        # without the vertical flip of the up scan its acquired rows would not overlap at all
        assert not (np.isfinite(a[::-1]).any(axis=1) & np.isfinite(b).any(axis=1)).any()


def test_partial_up_scan_matches_its_complete_twin(sxm_dir: Path) -> None:
    full = read_sxm(_file(sxm_dir, "porphyrin_dimer_96_up_7ch.sxm"))
    part = read_sxm(_file(sxm_dir, "porphyrin_dimer_96_up_partial16pct.sxm"))
    assert not part.valid_rows[:15].any() and part.valid_rows[15:].all()  # the top was not reached
    assert _corr(_flat(full.frame("Z")), _flat(part.frame("Z"))) > 0.9


@pytest.mark.parametrize(
    "name", ["cu111_tcne_steps_clusters_50nm_256_down.sxm", "hbn_100nm_144x168_down_nan85pct.sxm", "createc_converted_512x60_down.sxm"]
)
def test_constructed_up_scan_reads_like_the_down_original(sxm_dir: Path, name: str) -> None:
    """Reverse the stored rows of a real down scan and set SCAN_DIR up: the display must not change."""
    b, text, start = _raw(_file(sxm_dir, name))
    nx, ny = (int(v) for v in _section(text, "SCAN_PIXELS").split())
    head = b[:start].replace(b":SCAN_DIR:\ndown\n", b":SCAN_DIR:\nup\n")
    assert head != b[:start]
    data = np.frombuffer(b, np.uint8, offset=start).reshape(-1, ny, nx * 4)[:, ::-1].tobytes()
    orig, flipped = read_sxm(b, name=name), read_sxm(head + data, name="constructed")
    assert flipped.scan_direction == "up"
    np.testing.assert_array_equal(orig.valid_rows, flipped.valid_rows)
    for ch, frames in orig.channels.items():
        for d, a in frames.items():
            np.testing.assert_array_equal(flipped.channels[ch][d], a)


def test_cp1252_header_is_decoded(sxm_dir: Path) -> None:
    """A degree sign (0xB0) and an en dash (0x96, cp1252) in the comment survive decoding."""
    b = _file(sxm_dir, "porphyrin_dimer_96_up_7ch.sxm").read_bytes()
    b2 = b.replace(b":COMMENT:\n", b":COMMENT:\ntip at 4.4 K \x96 tilt 2.5\xb0\nsecond line\n", 1)
    scan = read_sxm(b2, name="with_degree.sxm")
    assert scan.comment == "tip at 4.4 K \u2013 tilt 2.5\u00b0\nsecond line"
    # bytes undefined in cp1252 fall back to Latin-1 instead of failing
    scan = read_sxm(b.replace(b":COMMENT:\n", b":COMMENT:\n\x81\xb0\n", 1), name="x.sxm")
    assert scan.comment == "\x81\u00b0"


# ------------------------------------------------------------------------ rotated coordinates
@pytest.mark.parametrize(
    "name",
    ["au111_molecule_chain_afm_96x192_up_angle59.sxm", "porphyrin_pair_128_up_nan51pct.sxm",
     "porphyrin_dimer_96_up_7ch.sxm", "generic5_au_molecule_256_down_angle135.sxm", "hbn_100nm_144x168_down_nan85pct.sxm"],
)
def test_px_to_nm_on_rotated_scans(sxm_dir: Path, name: str) -> None:
    scan = read_sxm(_file(sxm_dir, name))
    assert abs(scan.angle_deg) > 1
    nx, ny = scan.pixels
    w, h = scan.range_nm
    ox, oy = scan.offset_nm
    cx, cy = scan.px_to_nm((nx - 1) / 2, (ny - 1) / 2)
    assert (cx, cy) == pytest.approx((ox, oy), abs=1e-9)
    # corners (pixel edges) = offset + local corner rotated clockwise by the scan angle
    rot = np.exp(-1j * math.radians(scan.angle_deg))
    for px, py, u, v in [(-0.5, -0.5, -w / 2, h / 2), (nx - 0.5, -0.5, w / 2, h / 2), (-0.5, ny - 0.5, -w / 2, -h / 2), (nx - 0.5, ny - 0.5, w / 2, -h / 2)]:
        x, y = scan.px_to_nm(px, py)
        want = complex(ox, oy) + complex(u, v) * rot
        assert (x, y) == pytest.approx((want.real, want.imag), abs=1e-9)
        assert math.hypot(x - ox, y - oy) == pytest.approx(math.hypot(w, h) / 2)
    # the top edge runs along the scan angle, clockwise from +x
    (x0, x1), (y0, y1) = scan.px_to_nm(np.array([-0.5, nx - 0.5]), np.array([-0.5, -0.5]))
    assert math.degrees(math.atan2(y1 - y0, x1 - x0)) == pytest.approx(-scan.angle_deg if scan.angle_deg <= 180 else 360 - scan.angle_deg)
    # nm_to_px inverts px_to_nm
    xs, ys = np.meshgrid(np.linspace(-3, nx + 2, 7), np.linspace(-3, ny + 2, 5))
    bx, by = scan.nm_to_px(*scan.px_to_nm(xs, ys))
    np.testing.assert_allclose(bx, xs, atol=1e-9)
    np.testing.assert_allclose(by, ys, atol=1e-9)
    # the header's own Scan>Scanfield (x;y;w;h;angle, SI) agrees where it is written
    field = scan.header.get("Scan>Scanfield")
    if field is not None:
        fx, fy, fw, fh, fa = (float(v) for v in field.split(";"))
        assert (fx * 1e9, fy * 1e9, fw * 1e9, fh * 1e9) == pytest.approx((ox, oy, w, h), rel=1e-3, abs=1e-3)
        # SCAN_ANGLE is printed with 4 significant digits (1.011E+2 for 101.051)
        assert fa == pytest.approx(scan.angle_deg, rel=5e-4, abs=5e-4)


def test_nanonispy2_header_parser_agrees(sxm_dir: Path) -> None:
    """Cross-check with nanonispy2's parser on the files it can parse (it fails on the Createc ones)."""
    from nanonispy2.read import _parse_sxm_header

    checked = 0
    for name in GOOD:
        if name.startswith("createc_") or name.startswith("aborted_"):
            continue
        path = _file(sxm_dir, name)
        b, _, _ = _raw(path)
        ref = _parse_sxm_header(b[: b.index(b":SCANIT_END:") + 13].decode("latin-1"))
        scan = read_sxm(path)
        assert scan.pixels == tuple(int(v) for v in ref["scan_pixels"])
        assert scan.range_nm == pytest.approx(tuple(ref["scan_range"] * 1e9))
        assert scan.offset_nm == pytest.approx(tuple(ref["scan_offset"] * 1e9))
        assert list(scan.channels) == list(ref["data_info"]["Name"])
        assert scan.bias_V == pytest.approx(ref["bias"])
        checked += 1
    assert checked >= 20
