"""Labelled STM images for tests and evaluation: COCO detection JSON, labelme JSON, Pascal VOC XML,
class-folder crops (:func:`load_labelled` detects which), and the matching of detections to
ground-truth boxes (IoU >= 0.5, configurable, or centroid inside the box).
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from stm_agent.adapters.images import IMAGE_SUFFIXES
from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import ImageFormatError


@dataclass
class LabelledImage:
    """One image with its ground-truth boxes.

    Attributes
    ----------
    path : Path
    width, height : int
        Image size, pixels.
    boxes : np.ndarray
        float64 ``(K, 4)`` ``(x, y, w, h)`` pixels, origin top-left.
    labels : list[str]
        Class name of each box.
    ann_ids : list[int]
        Identity of each box: the COCO annotation id; for labelme / VOC the running index of the
        box over the whole set (1..), in file then box order. Empty = not given.
    pixel_size_nm : tuple[float, float] | None
        ``(dx, dy)`` nm per pixel when the annotation gives it (COCO image entry ``pixel_size_nm``,
        a number or ``[dx, dy]``), else None (rendered image without a physical size).
    """

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: list[str]
    ann_ids: list[int] = field(default_factory=list)
    pixel_size_nm: tuple[float, float] | None = None


def load_coco(folder: str | Path) -> tuple[list[LabelledImage], list[str]]:
    """Read ``<folder>/annotations.json`` (or the given ``.json`` file): COCO detection.

    Boxes are COCO ``bbox`` ``[x, y, w, h]`` (pixels, origin top-left); image paths are relative
    to the file's folder.

    Returns
    -------
    (images, categories) : images sorted by file name; category names ordered by id.

    Raises
    ------
    ImageFormatError
        Missing or malformed annotation file (names it and the reason).
    """
    p = Path(folder)
    if p.is_dir():
        p = p / "annotations.json"
    folder = p.parent
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        cats = {c["id"]: c["name"] for c in data["categories"]}
        out = []
        for im in sorted(data["images"], key=lambda i: i["file_name"]):
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            out.append(
                LabelledImage(
                    path=Path(folder) / im["file_name"],
                    width=int(im["width"]),
                    height=int(im["height"]),
                    boxes=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
                    labels=[cats[a["category_id"]] for a in anns],
                    ann_ids=[int(a["id"]) for a in anns],
                    pixel_size_nm=_pixel_size(im.get("pixel_size_nm")),
                )
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageFormatError(p, f"not a readable COCO annotation file ({e})") from None
    return out, [cats[k] for k in sorted(cats)]


def _pixel_size(v) -> tuple[float, float] | None:
    """COCO ``pixel_size_nm`` (number or ``[dx, dy]``) -> ``(dx, dy)``; None when absent or not positive."""
    if v is None:
        return None
    a = np.atleast_1d(np.asarray(v, np.float64)).ravel()
    if a.size == 0 or not np.all(np.isfinite(a)) or not np.all(a > 0):
        return None
    return (float(a[0]), float(a[-1]))



def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, read with OpenCV (raises ImageFormatError)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageFormatError(path, "cannot be decoded as an image")
    return int(img.shape[1]), int(img.shape[0])


def _labelme_one(p: Path, first_id: int) -> LabelledImage:
    """One labelme JSON file -> :class:`LabelledImage` (rectangles and polygons -> bounding boxes)."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        img_path = p.parent / str(data["imagePath"]).replace("\\", "/")
        boxes, labels = [], []
        for sh in data["shapes"]:
            pts = np.asarray(sh["points"], dtype=np.float64).reshape(-1, 2)
            if sh.get("shape_type", "polygon") not in ("rectangle", "polygon") or len(pts) < 2:
                continue  # points, lines, circles: not an object box
            x0, y0 = pts.min(axis=0)
            x1, y1 = pts.max(axis=0)
            boxes.append((x0, y0, x1 - x0, y1 - y0))
            labels.append(str(sh["label"]))
        w, h = data.get("imageWidth"), data.get("imageHeight")
        w, h = (int(w), int(h)) if w and h else _image_size(img_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageFormatError(p, f"not a readable labelme annotation file ({e})") from None
    return LabelledImage(img_path, w, h, np.array(boxes, np.float64).reshape(-1, 4), labels,
                         list(range(first_id, first_id + len(boxes))))


def load_labelme(path: str | Path) -> tuple[list[LabelledImage], list[str]]:
    """Read labelme JSON: one file or a folder of them (one file per image).

    A ``rectangle`` or ``polygon`` shape becomes its bounding box ``(x, y, w, h)`` from the min/max
    of its points (pixels, origin top-left, as labelme stores them); other shape types are skipped.
    ``imagePath`` is relative to the JSON file; the size is ``imageWidth/imageHeight`` (or read
    from the image).

    Returns
    -------
    (images, classes) : images sorted by image file name; class names sorted.

    Raises
    ------
    ImageFormatError
        Unreadable or malformed file (names it and the reason), or no file found.
    """
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    return _read_each([f for f in files if f.name != "annotations.json"], _labelme_one, p, "labelme .json")


def _voc_one(p: Path, first_id: int) -> LabelledImage:
    """One Pascal VOC XML file -> :class:`LabelledImage`."""
    try:
        root = ET.parse(p).getroot()
        if root.tag != "annotation":
            raise ValueError(f"root element is <{root.tag}>, expected <annotation>")
        img_path = p.parent / root.findtext("filename", "").strip()
        boxes, labels = [], []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            # VOC corners are 1-based inclusive pixels: the VOC->COCO rule of the data's authors
            boxes.append((x0 - 1.0, y0 - 1.0, x1 - x0 + 1.0, y1 - y0 + 1.0))
            labels.append(obj.findtext("name", "").strip())
        size = root.find("size")
        if size is not None and size.findtext("width"):
            w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
        else:
            w, h = _image_size(img_path)
    except (OSError, ValueError, TypeError, AttributeError, ET.ParseError) as e:
        raise ImageFormatError(p, f"not a readable Pascal VOC annotation file ({e})") from None
    return LabelledImage(img_path, w, h, np.array(boxes, np.float64).reshape(-1, 4), labels,
                         list(range(first_id, first_id + len(boxes))))


def load_voc(path: str | Path) -> tuple[list[LabelledImage], list[str]]:
    """Read Pascal VOC XML (labelImg): one file or a folder of them (one file per image).

    ``<bndbox>`` corners are 1-based inclusive; the box is ``x = xmin - 1, y = ymin - 1,
    w = xmax - xmin + 1, h = ymax - ymin + 1`` (the rule the F-HPB/sparse authors used for their
    COCO files, which it reproduces box for box). ``<filename>`` is relative to the XML file.

    Returns
    -------
    (images, classes) : images sorted by image file name; class names sorted.

    Raises
    ------
    ImageFormatError
        Unreadable or malformed file (names it and the reason), or no file found.
    """
    p = Path(path)
    return _read_each(sorted(p.glob("*.xml")) if p.is_dir() else [p], _voc_one, p, "Pascal VOC .xml")


def _read_each(files: list[Path], read_one, where: Path, what: str) -> tuple[list[LabelledImage], list[str]]:
    """One annotation file per image (labelme, VOC): read each with ``read_one(file, first_id)``,
    annotation ids counting on across files; images sorted by file name; class names sorted."""
    if not files:
        raise ImageFormatError(where, f"no {what} file found")
    out, nid = [], 1
    for f in files:
        im = read_one(f, nid)
        nid += len(im.labels)
        out.append(im)
    out.sort(key=lambda i: i.path.name)
    return out, sorted({lab for im in out for lab in im.labels})


@dataclass
class LabelledSet:
    """A labelled data set in any supported format.

    Attributes
    ----------
    name : str
        Folder (or file stem) name.
    format : str
        ``"coco"``, ``"labelme"``, ``"voc"`` or ``"crops"``.
    classes : list[str]
        Class names (COCO: ordered by category id; others sorted).
    images : list[LabelledImage]
        Images with boxes (empty for ``crops``).
    crops : dict[str, list[Path]]
        ``crops`` only: ``{class: crop image paths}`` (:func:`crop_folders`).
    """

    name: str
    format: str
    classes: list[str]
    images: list[LabelledImage] = field(default_factory=list)
    crops: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        """Ground-truth objects: boxes, or crop files."""
        if self.format == "crops":
            return sum(len(v) for v in self.crops.values())
        return sum(len(im.labels) for im in self.images)


def load_labelled(path: str | Path) -> LabelledSet:
    """Load a labelled set, detecting its format.

    * a folder with ``annotations.json``, or a ``.json`` file with ``images`` and ``annotations``:
      COCO detection (:func:`load_coco`);
    * a ``.json`` file with ``shapes``, or a folder of such files: labelme (:func:`load_labelme`);
    * an ``.xml`` file, or a folder of them: Pascal VOC (:func:`load_voc`);
    * a folder of class sub-folders holding images: single-object crops (:func:`crop_folders`).

    Raises
    ------
    ImageFormatError
        The path is missing, in no recognised format, or its annotation file is malformed (the
        error names the file and the reason).
    """
    p = Path(path)
    if not p.exists():
        raise ImageFormatError(p, "labelled data not found")
    if p.is_dir():
        if (p / "annotations.json").is_file():
            ims, cl = load_coco(p)
            return LabelledSet(p.name, "coco", cl, ims)
        if any(p.glob("*.xml")):
            ims, cl = load_voc(p)
            return LabelledSet(p.name, "voc", cl, ims)
        if any(p.glob("*.json")):
            ims, cl = load_labelme(p)
            return LabelledSet(p.name, "labelme", cl, ims)
        crops = crop_folders(p)
        if crops:
            return LabelledSet(p.name, "crops", sorted(crops), crops=crops)
        raise ImageFormatError(p, "no annotations.json, labelme .json, VOC .xml or class folders of images")
    if p.suffix.lower() == ".xml":
        ims, cl = load_voc(p)
        return LabelledSet(p.stem, "voc", cl, ims)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ImageFormatError(p, f"not readable JSON ({e})") from None
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            ims, cl = load_coco(p)
            return LabelledSet(p.stem, "coco", cl, ims)
        if isinstance(data, dict) and "shapes" in data:
            ims, cl = load_labelme(p)
            return LabelledSet(p.stem, "labelme", cl, ims)
        raise ImageFormatError(p, "JSON is neither COCO (images + annotations) nor labelme (shapes)")
    raise ImageFormatError(p, "unknown annotation format (expected a folder, .json or .xml)")


def crop_folders(folder: str | Path) -> dict[str, list[Path]]:
    """Class folders of single-object crops: ``{class: sorted image paths}`` (png/jpg/tif)."""
    out = {}
    for d in sorted(Path(folder).iterdir()):
        if d.is_dir():
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                out[d.name] = files
    return out


def read_grey(path: str | Path) -> np.ndarray:
    """Luminance of an image file, float32 ``(ny, nx)`` in 0..1 (ITU-R BT.601 weights, OpenCV).

    Raises
    ------
    ImageFormatError
        The file cannot be decoded as an image.
    """
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageFormatError(path, "cannot be decoded as an image")
    if img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / scale).astype(np.float32)


def image_scan(path: str | Path, pixel_size_nm: float = 1.0) -> Scan:
    """A rendered image as a :class:`Scan` (grey luminance as channel ``Z`` forward).

    Uses ``adapters.images.read_image`` when that adapter exists, else :func:`read_grey`.
    """
    try:
        from stm_agent.adapters.images import read_image  # type: ignore[import-not-found]
    except ImportError:
        read_image = None
    if read_image is not None:
        return read_image(path, pixel_size_nm)
    g = read_grey(path)
    ny, nx = g.shape
    return Scan(
        source=str(path),
        frame_id=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        channels={"Z": {"forward": g}},
        units={"Z": "a.u."},
        range_nm=(nx * pixel_size_nm, ny * pixel_size_nm),
        valid_rows=np.ones(ny, bool),
    )


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a`` ``(N, 4)`` and ``b`` ``(K, 4)`` in ``(x, y, w, h)`` -> float64 ``(N, K)``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, 0, None], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, 1, None], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-12)


def match_boxes(det_boxes: np.ndarray, det_centroids: np.ndarray, gt_boxes: np.ndarray,
                iou_min: float = 0.5, centroid_inside: bool = True) -> np.ndarray:
    """One-to-one matching of detections to ground truth (greedy by IoU, then centroid distance).

    A pair qualifies when IoU >= ``iou_min`` or (``centroid_inside``) the detection's centroid
    lies inside the ground-truth box. The evaluation uses IoU only (a lobe inside a box is not the
    molecule found).

    Parameters
    ----------
    det_boxes : ``(N, 4)`` ``(x, y, w, h)``; det_centroids : ``(N, 2)`` ``(x, y)``; gt_boxes : ``(K, 4)``.
    iou_min : float
        IoU at or above which a pair qualifies (default 0.5, PASCAL VOC).

    Returns
    -------
    np.ndarray
        int ``(N,)``: index of the matched ground-truth box, -1 for unmatched detections.
    """
    n, k = len(det_boxes), len(gt_boxes)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or k == 0:
        return out
    iou = box_iou(det_boxes, gt_boxes)
    c = np.asarray(det_centroids, np.float64).reshape(-1, 2)
    g = np.asarray(gt_boxes, np.float64)
    inside = (
        (c[:, 0, None] >= g[None, :, 0]) & (c[:, 0, None] <= g[None, :, 0] + g[None, :, 2])
        & (c[:, 1, None] >= g[None, :, 1]) & (c[:, 1, None] <= g[None, :, 1] + g[None, :, 3])
    )
    gc = g[:, :2] + g[:, 2:] / 2
    dist = np.hypot(c[:, 0, None] - gc[None, :, 0], c[:, 1, None] - gc[None, :, 1])
    ok = (iou >= iou_min) | (inside & centroid_inside)
    # rank qualifying pairs: higher IoU first, then closer centroid
    score = np.where(ok, iou - 1e-6 * dist, -np.inf)
    order = np.argsort(-score, axis=None)
    used_d, used_g = np.zeros(n, bool), np.zeros(k, bool)
    for flat in order:
        if not np.isfinite(score.flat[flat]):
            break
        i, j = divmod(int(flat), k)
        if not used_d[i] and not used_g[j]:
            out[i], used_d[i], used_g[j] = j, True, True
    return out


def _box_on_border(b: np.ndarray, width: int, height: int, margin: float = 1.0) -> np.ndarray:
    """bool ``(K,)``: box ``(x, y, w, h)`` within ``margin`` px of the image border (a cut object)."""
    b = np.asarray(b, np.float64).reshape(-1, 4)
    return (b[:, 0] <= margin) | (b[:, 1] <= margin) | (b[:, 0] + b[:, 2] >= width - margin) | (
        b[:, 1] + b[:, 3] >= height - margin
    )
