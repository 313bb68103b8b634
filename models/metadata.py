"""``model.json``: what an exported ONNX encoder is, written by :mod:`models.export` and checked by
:class:`models.clip_onnx.ClipOnnxEncoder` on load.

A model folder holds ``model.onnx`` (the image tower, input ``image`` float32 ``(N, 3, H, W)``,
output ``embedding`` float32 ``(N, D)``, not normalised) and ``model.json`` (this record). The
sha256 of the ONNX file is recorded so that a cached reference embedding can never be matched
against the output of another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stm_agent.agent.errors import ModelError

METADATA_FILE = "model.json"
SCHEMA = 1


def model_file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a model or checkpoint file (``hashlib.file_digest``: streamed, not read whole).

    Raises
    ------
    ModelError
        The file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ModelError(path, f"cannot read the model file: {e.strerror or e}") from None


@dataclass
class ModelMetadata:
    """Contents of ``model.json``.

    Attributes
    ----------
    arch : str
        open_clip architecture name, e.g. ``"ViT-B-32"``.
    pretrained : str
        Weights: an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``), ``"file:<name>"`` for a
        local checkpoint, or ``"none"`` (random weights, for tests and benchmarks only).
    image_size : int
        Side of the square network input, pixels (224 for ViT-B-32).
    mean, std : list[float]
        Per-channel (R, G, B) normalisation applied after scaling grey values to 0..1.
    interpolation : str
        Resize filter of the open_clip transform (``"bicubic"`` | ``"bilinear"``).
    resize_mode : str
        ``"shortest"``: shortest side to ``image_size``, then centre crop (open_clip default).
    embed_dim : int
        Length D of the embedding.
    onnx_file : str
        Name of the ONNX file in the model folder.
    onnx_sha256 : str
        sha256 (hex) of the ONNX file.
    precision : str
        ``"fp32"`` | ``"fp16"`` (fp16 weights, fp32 input/output) | ``"int8"`` (dynamic int8
        quantization of the weights).
    opset : int
        ONNX opset of the graph.
    open_clip_version, torch_version : str
        Versions used for the export.
    checkpoint_sha256 : str | None
        sha256 of the local checkpoint, when ``pretrained`` is a file.
    checks : dict
        Export-time checks (ONNX vs torch max abs difference, cosine vs fp32 ...).
    """

    arch: str
    pretrained: str
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str
    embed_dim: int
    onnx_sha256: str
    precision: str = "fp32"
    resize_mode: str = "shortest"
    onnx_file: str = "model.onnx"
    opset: int = 17
    open_clip_version: str = ""
    torch_version: str = ""
    checkpoint_sha256: str | None = None
    created_at: str = ""
    schema: int = SCHEMA
    checks: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def write(self, model_dir: str | Path) -> Path:
        """Write ``model_dir/model.json`` (pretty-printed, sorted keys); returns its path."""
        p = Path(model_dir) / METADATA_FILE
        p.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return p

    @classmethod
    def read(cls, model_dir: str | Path) -> "ModelMetadata":
        """Read and validate ``model_dir/model.json``.

        Raises
        ------
        ModelError
            The folder or file is missing, not JSON, lacks required keys, or has values of the
            wrong kind (the message names the file and the key).
        """
        d = Path(model_dir)
        p = d / METADATA_FILE
        if not d.is_dir():
            raise ModelError(d, "model folder not found (export one with `stm-agent models export`)")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(p, "model.json missing: not a folder written by `stm-agent models export`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(p, f"model.json is not readable JSON: {e}") from None
        if not isinstance(data, dict):
            raise ModelError(p, "model.json must hold a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        required = {"arch", "pretrained", "image_size", "mean", "std", "interpolation", "embed_dim", "onnx_sha256"}
        missing = sorted(required - set(data))
        if missing:
            raise ModelError(p, f"model.json lacks key(s) {missing}")
        try:
            md = cls(**{k: v for k, v in data.items() if k in known})
            md.image_size = int(md.image_size)
            md.embed_dim = int(md.embed_dim)
            md.mean = [float(v) for v in md.mean]
            md.std = [float(v) for v in md.std]
        except (TypeError, ValueError) as e:
            raise ModelError(p, f"model.json has a value of the wrong type: {e}") from None
        if len(md.mean) != 3 or len(md.std) != 3 or min(md.std) <= 0:
            raise ModelError(p, f"mean/std must be 3 numbers each (std > 0), got {md.mean}, {md.std}")
        if md.interpolation not in ("bicubic", "bilinear"):
            raise ModelError(p, f"interpolation {md.interpolation!r} unsupported; allowed: bicubic, bilinear")
        if md.resize_mode != "shortest":
            raise ModelError(p, f"resize_mode {md.resize_mode!r} unsupported; allowed: shortest")
        if md.image_size < 8 or md.embed_dim < 1:
            raise ModelError(p, f"implausible image_size {md.image_size} / embed_dim {md.embed_dim}")
        return md
