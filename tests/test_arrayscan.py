"""scan.array wire format: validation, scan_from_array, encoders (real scans from ../shared/data/sxm)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from stm_agent.adapters.arrayscan import (
    ArrayHeaderError,
    array_meta_from_scan,
    encode_array_message,
    encode_saved_message,
    encode_sxm_message,
    scan_from_array,
    validate_array_header,
)
from stm_agent.adapters.replay import make_unique_array, make_unique_sxm
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.errors import EmptyScanError, ScanFormatError

REAL = ["cu111_tcne_molecules_4nm_256_up.sxm", "porphyrin_pair_128_down_nan51pct.sxm",
        "au111_molecule_chain_afm_96x192_up_angle59.sxm"]


@pytest.mark.parametrize("name", REAL)
def test_round_trip_real_scan(sxm_dir, name):
    scan = read_sxm(sxm_dir / name)
    frame = scan.frame("Z", "forward")
    topic, body, payload = encode_array_message(frame, array_meta_from_scan(scan))
    assert topic == b"scan.array"
    meta = json.loads(body)
    assert meta["shape"] == list(frame.shape) and meta["dtype"] == "<f4"
    fid = hashlib.sha256(payload).hexdigest()
    got = scan_from_array(meta, payload, source="controller:test", frame_id=fid)
    out = got.frame("Z", "forward")
    assert out.dtype == np.float32 and out.shape == frame.shape
    np.testing.assert_array_equal(out, frame)  # NaN rows kept, NaN == NaN here
    assert got.pixel_size_nm == pytest.approx(scan.pixel_size_nm, rel=1e-12)
    assert got.range_nm == pytest.approx(scan.range_nm, rel=1e-12)
    assert got.bias_V == scan.bias_V and got.setpoint_A == scan.setpoint_A
    assert got.angle_deg == scan.angle_deg and got.offset_nm == pytest.approx(scan.offset_nm)
    assert got.scan_direction == scan.scan_direction and got.acquired_at == scan.acquired_at
    np.testing.assert_array_equal(got.valid_rows, np.isfinite(frame).any(axis=1))
    assert got.units == {"Z": scan.units["Z"]} and got.frame_id == fid


def test_other_dtypes_and_byte_orders():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    for arr in (a.astype(">f8"), a.astype("<i2"), a.astype(">f4"), a.astype(np.uint8)):
        _, body, payload = encode_array_message(arr, {"range_nm": [4.0, 3.0], "channel": "Current", "unit": "A",
                                                       "direction": "backward"})
        s = scan_from_array(json.loads(body), payload, source="t", frame_id="x")
        np.testing.assert_array_equal(s.frame("Current", "backward"), a.astype(np.float32))
        assert s.pixel_size_nm == (1.0, 1.0)
    # non-square pixels, pixel size given as a pair, consistent range accepted
    h = validate_array_header({"shape": [2, 4], "dtype": "f4", "pixel_size_nm": [0.5, 2.0], "range_nm": [2.0, 4.0]}, 32)
    assert h.range_nm == (2.0, 4.0) and h.pixel_size_nm == (0.5, 2.0)


GOOD = {"shape": [2, 3], "dtype": "<f4", "pixel_size_nm": 0.1}


@pytest.mark.parametrize("change, field", [
    ({"shape": None}, "shape"),
    ({"shape": [2]}, "shape"),
    ({"shape": [0, 3]}, "shape"),
    ({"shape": [2.0, 3]}, "shape"),
    ({"shape": [True, 3]}, "shape"),
    ({"shape": [70000, 3]}, "shape"),
    ({"dtype": None}, "dtype"),
    ({"dtype": "nonsense"}, "dtype"),
    ({"dtype": "<U4"}, "dtype"),
    ({"dtype": "O"}, "dtype"),
    ({"dtype": "c8"}, "dtype"),
    ({"dtype": 4}, "dtype"),
    ({"pixel_size_nm": None}, "pixel_size_nm"),
    ({"pixel_size_nm": -1}, "pixel_size_nm"),
    ({"pixel_size_nm": "0.1"}, "pixel_size_nm"),
    ({"pixel_size_nm": [0.1, float("nan")]}, "pixel_size_nm"),
    ({"range_nm": [1, 1]}, "range_nm"),  # disagrees with pixel size x shape
    ({"direction": "sideways"}, "direction"),
    ({"channel": 3}, "channel"),
    ({"channel": ""}, "channel"),
    ({"bias_V": "1 V"}, "bias_V"),
    ({"setpoint_A": float("inf")}, "setpoint_A"),
    ({"angle_deg": [1]}, "angle_deg"),
    ({"offset_nm": [1]}, "offset_nm"),
    ({"scan_direction": "left"}, "scan_direction"),
    ({"acquired_at": "yesterday"}, "acquired_at"),
    ({"unit": 1}, "unit"),
])
def test_bad_header_names_source_and_field(change, field):
    meta = {**GOOD, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(ArrayHeaderError) as ei:
        scan_from_array(meta, b"\0" * 24, source="controller:cam1", frame_id="x")
    assert isinstance(ei.value, ScanFormatError)
    assert ei.value.field == field
    assert ei.value.source == "controller:cam1"
    assert str(ei.value).startswith("controller:cam1: ") and field in str(ei.value)


def test_payload_size_and_header_type():
    with pytest.raises(ArrayHeaderError, match="payload has 20 bytes, the header announces 24") as ei:
        scan_from_array(GOOD, b"\0" * 20, source="s", frame_id="x")
    assert ei.value.field == "payload"
    with pytest.raises(ArrayHeaderError, match="JSON object"):
        validate_array_header([1, 2], source="s")


def test_all_nan_is_empty_scan():
    payload = np.full((2, 3), np.nan, "<f4").tobytes()
    with pytest.raises(EmptyScanError, match="s: no acquired lines"):
        scan_from_array(GOOD, payload, source="s", frame_id="x")


def test_encoders():
    assert encode_sxm_message(b"abc", "a.sxm") == [b"scan.sxm", b'{"name":"a.sxm"}', b"abc"]
    t, body = encode_saved_message("/data/x.sxm")
    assert t == b"scan.saved" and json.loads(body)["path"] == "/data/x.sxm"
    with pytest.raises(ArrayHeaderError, match="2-D"):
        encode_array_message(np.zeros(3, np.float32), {"pixel_size_nm": 1})
    with pytest.raises(ArrayHeaderError, match="pixel_size_nm"):
        encode_array_message(np.zeros((2, 2), np.float32), {})


def test_unique_variants_still_read(sxm_dir):
    data = (sxm_dir / "porphyrin_dimer_96_up_7ch.sxm").read_bytes()
    orig = read_sxm(data)
    ids = set()
    for i in (0, 1, 999):
        u = make_unique_sxm(data, i)
        s = read_sxm(u, name="u")
        ids.add(s.frame_id)
        assert s.comment.splitlines()[0] == f"stm-agent replay {i}"
        for ch in orig.channels:
            for d in orig.channels[ch]:
                np.testing.assert_array_equal(s.channels[ch][d], orig.channels[ch][d])
    assert len(ids) == 3 and orig.frame_id not in ids
    frame = orig.frame("Z")
    arrs = [make_unique_array(frame, i) for i in range(50)]
    assert len({a.tobytes() for a in arrs}) == 50
    for a in arrs:
        diff = np.flatnonzero(~((a == frame) | (np.isnan(a) & np.isnan(frame))))
        assert diff.size == 1
        k = diff[0]
        assert abs(a.flat[k] - frame.flat[k]) <= 1e-4 * abs(frame.flat[k])


def test_unique_sxm_without_comment_section(sxm_dir):
    data = (sxm_dir / "hbn_point_defect_96x100_down.sxm").read_bytes()
    stripped = data.replace(b":COMMENT:", b":REMARK:", 1)
    u = make_unique_sxm(stripped, 7)
    s = read_sxm(u, name="u")
    assert s.comment == "stm-agent replay 7"
    np.testing.assert_array_equal(s.frame("Z"), read_sxm(data).frame("Z"))
