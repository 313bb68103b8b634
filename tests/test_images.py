"""adapters.images and adapters.scanfile on real rendered STM images and real scan frames."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stm_agent.adapters.images import read_image
from stm_agent.adapters.scanfile import read_scan
from stm_agent.adapters.sxm import read_sxm
from stm_agent.agent.errors import ImageFormatError, ScanFormatError


def _coco_images(labelled_dir: Path, folder: str) -> list[tuple[Path, int, int]]:
    ann = json.loads((labelled_dir / folder / "annotations.json").read_text())
    return [(labelled_dir / folder / im["file_name"], im["width"], im["height"]) for im in ann["images"]]


@pytest.mark.parametrize("folder", ["fhpb", "sparse", "wse2_defects"])
def test_real_renders_read_with_their_coco_size(labelled_dir: Path, folder: str) -> None:
    images = _coco_images(labelled_dir, folder)
    assert images
    for path, width, height in images[:4]:
        scan = read_image(path, 0.05)
        assert scan.pixels == (width, height)
        z = scan.frame("Z")
        assert z.dtype == np.float32 and z.shape == (height, width)
        assert 0.0 <= float(z.min()) < float(z.max()) <= 1.0
        assert scan.units == {"Z": "a.u."} and list(scan.channels["Z"]) == ["forward"]
        assert scan.range_nm == pytest.approx((width * 0.05, height * 0.05))
        assert scan.frame_id == hashlib.sha256(path.read_bytes()).hexdigest()
        assert scan.valid_rows.all() and scan.scan_direction == "unknown"


def test_colour_render_becomes_bt601_luminance(labelled_dir: Path) -> None:
    path = _coco_images(labelled_dir, "sparse")[0][0]  # blue colour map, RGBA PNG
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.float64)
    want = (0.299 * bgr[..., 2] + 0.587 * bgr[..., 1] + 0.114 * bgr[..., 0]) / 255.0
    scan = read_image(path, (0.02, 0.03))
    np.testing.assert_allclose(scan.frame("Z"), want, atol=1e-4)
    assert scan.pixel_size_nm == pytest.approx((0.02, 0.03))


def _grey(sxm_dir: Path) -> np.ndarray:
    """A real topograph (Z forward, plane removed) scaled to 0..1."""
    scan = read_sxm(sxm_dir / "cu111_tcne_molecules_4nm_256_up.sxm")
    z = scan.frame("Z").astype(np.float64)
    yy, xx = np.mgrid[: z.shape[0], : z.shape[1]]
    coef, *_ = np.linalg.lstsq(np.c_[xx.ravel(), yy.ravel(), np.ones(z.size)], z.ravel(), rcond=None)
    z = z - (coef[0] * xx + coef[1] * yy + coef[2])
    return (z - z.min()) / (z.max() - z.min())


@pytest.mark.parametrize("suffix, dtype", [(".png", np.uint16), (".tif", np.uint16), (".png", np.uint8), (".tiff", np.uint8), (".bmp", np.uint8)])
def test_8_and_16_bit_grey_renders_of_a_real_scan(sxm_dir: Path, tmp_path: Path, suffix: str, dtype) -> None:
    g = _grey(sxm_dir)
    top = np.iinfo(dtype).max
    path = tmp_path / f"render{suffix}"
    assert cv2.imwrite(str(path), np.round(g * top).astype(dtype))
    z = read_image(path, 4.0 / 256).frame("Z")
    np.testing.assert_allclose(z, g, atol=0.51 / top + 1e-6)


def test_colour_mapped_render_keeps_the_topography(sxm_dir: Path, tmp_path: Path) -> None:
    """A viridis render (luminance rises along the map) correlates with the grey topograph."""
    g = _grey(sxm_dir)
    path = tmp_path / "viridis.jpg"
    assert cv2.imwrite(str(path), cv2.applyColorMap(np.round(g * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS))
    z = read_image(path, 0.0156).frame("Z").astype(np.float64)
    assert np.corrcoef(z.ravel(), g.ravel())[0, 1] > 0.97


def test_image_errors_name_the_file(sxm_dir: Path, tmp_path: Path, labelled_dir: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(ImageFormatError, match=r"notes\.png: not a readable"):
        read_image(text, 0.1)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageFormatError, match=r"empty\.jpg: empty file"):
        read_image(empty, 0.1)
    with pytest.raises(ImageFormatError, match=r"gone\.png: cannot read"):
        read_image(tmp_path / "gone.png", 0.1)
    real = _coco_images(labelled_dir, "fhpb")[0][0]
    for bad in (0, -1.0, float("nan"), (0.1, 0.0), "x", (1, 2, 3)):
        with pytest.raises(ImageFormatError, match="pixel size"):
            read_image(real, bad)  # type: ignore[arg-type]
    # a truncated real JPEG/PNG: typed error or a decoded image, never a crash
    cut = tmp_path / "cut.png"
    cut.write_bytes(real.read_bytes()[:200])
    with pytest.raises(ImageFormatError):
        read_image(cut, 0.1)


def test_read_scan_dispatch(sxm_dir: Path, labelled_dir: Path, tmp_path: Path) -> None:
    scan = read_scan(sxm_dir / "moire_10nm_160_down.sxm")
    assert scan.pixels == (160, 160) and set(scan.channels) == {"Z", "Current"}
    img = _coco_images(labelled_dir, "wse2_defects")[0][0]
    with pytest.raises(ImageFormatError, match="pixel_size_nm"):
        read_scan(img)
    assert read_scan(img, 0.2).pixel_size_nm == pytest.approx((0.2, 0.2))
    upper = tmp_path / "SCAN.SXM"
    upper.write_bytes((sxm_dir / "moire_10nm_160_down.sxm").read_bytes())
    assert read_scan(upper).frame_id == scan.frame_id
    other = tmp_path / "grid.3ds"
    other.write_bytes((sxm_dir / "bad" / "grid_3ds_misnamed.sxm").read_bytes())
    with pytest.raises(ScanFormatError, match=r"grid\.3ds: unsupported file type '\.3ds'"):
        read_scan(other)
    with pytest.raises(ScanFormatError, match="not a Nanonis .sxm"):
        read_scan(sxm_dir / "bad" / "not_an_sxm.sxm")
