"""Runtime CLIP image encoder: an ONNX export of open_clip's image tower run by onnxruntime.

No torch, no open_clip at run time: preprocessing is :func:`models.preprocess.clip_preprocess`
(identical to open_clip's transform) and the network is the ``model.onnx`` written by
:func:`models.export.export_clip`. UniMR uses the CLIP ViT-B/32 image embedding (512-d) as its
"semantic" feature (Cao et al., Adv. Sci. 2025).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from stm_agent.agent.errors import ModelError
from stm_agent.models.base import l2_normalise
from stm_agent.models.metadata import ModelMetadata, sha256_file
from stm_agent.models.preprocess import clip_preprocess

log = logging.getLogger(__name__)


def available_providers() -> list[str]:
    """onnxruntime execution providers to use, best first: CUDA when available, then CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have] or have


def create_session(path: str | Path, sess_options=None, providers: list[str] | None = None):
    """An onnxruntime ``InferenceSession`` and the execution provider it actually runs on.

    The provider is read from the session (``session.get_providers()[0]``), never from
    ``get_available_providers()``, which lists CUDA whenever onnxruntime-gpu is installed, GPU
    or not. With onnxruntime-gpu on a machine without a usable GPU (no device, no CUDA/cuDNN
    libraries) the session runs on the CPU: onnxruntime's error lines about the missing CUDA
    libraries are silenced and one INFO line says so.

    Parameters
    ----------
    path : str | Path
        The ``.onnx`` file.
    sess_options : onnxruntime.SessionOptions, optional
    providers : list[str], optional
        Providers to try, best first; default :func:`available_providers`.

    Returns
    -------
    (onnxruntime.InferenceSession, str)
        The session and its provider, e.g. ``"CUDAExecutionProvider"`` or ``"CPUExecutionProvider"``.

    Raises
    ------
    Exception
        Whatever onnxruntime raises for a file it cannot load (callers wrap it in ``ModelError``).
    """
    import onnxruntime as ort

    wanted = list(providers or available_providers())
    if "CUDAExecutionProvider" not in wanted:
        session = ort.InferenceSession(os.fspath(path), sess_options=sess_options, providers=wanted)
        return session, session.get_providers()[0]
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN from the nvidia-* wheels
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
    ort.set_default_logger_severity(4)  # a missing CUDA library is an ERROR line in onnxruntime's log
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=sess_options, providers=wanted)
    finally:
        ort.set_default_logger_severity(2)
    used = session.get_providers()[0]
    if used != "CUDAExecutionProvider":
        log.info("onnxruntime: the CUDA execution provider is not usable here (no GPU, or no CUDA 12/13 and "
                 "cuDNN 9 libraries: pip install \"stm-agent[gpu]\"); running on %s", used)
    return session, used


def session_options(precision: str = "fp32", threads: int = 0):
    """onnxruntime ``SessionOptions`` for a model of ``precision`` with ``threads`` intra-op threads.

    fp16 graphs get ``ORT_ENABLE_EXTENDED`` instead of ``ORT_ENABLE_ALL``: with onnxruntime 1.2x the
    layout optimisations of level ALL crash (segmentation fault) on the Cast-wrapped fp16 graph
    written by ``onnxruntime.transformers.float16``; EXTENDED keeps the fusions (attention, GELU,
    LayerNorm) and works.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if precision == "fp16"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return so


class ClipOnnxEncoder:
    """CLIP image encoder from an exported model folder (``model.onnx`` + ``model.json``).

    Parameters
    ----------
    model_dir : str | Path
        Folder written by ``stm-agent models export`` (or :func:`models.export.export_clip`).
    threads : int
        onnxruntime intra-op threads; 0 lets onnxruntime decide (all cores).
    batch_size : int
        Crops per ``session.run`` call (bounds the memory of the 224x224 input tensors:
        64 crops = 38 MB of float32).
    providers : list[str] | None
        onnxruntime execution providers; default :func:`available_providers`.
    expected_sha256 : str | None
        sha256 (hex) the ONNX file must have (``encoder.model_sha256``); None = trust ``model.json``.

    Attributes
    ----------
    id : str
        ``"clip-onnx/<arch>/<onnx sha256[:12]>"``; with a non-fp32 precision the precision is
        appended (``.../fp16``), so cached reference embeddings never mix models.
    meta : ModelMetadata
        The model's ``model.json``.
    dim : int
        Embedding length D (512 for ViT-B-32).
    provider : str
        The onnxruntime execution provider the session runs on (see :func:`create_session`).

    Raises
    ------
    ModelError
        Missing/invalid ``model.json``, missing ONNX file, sha256 of the ONNX file different from
        the one in ``model.json`` (file replaced or corrupted) or from ``expected_sha256`` (the
        pin of ``encoder.model_sha256``), or onnxruntime cannot load it.
    """

    name = "clip"

    def __init__(self, model_dir: str | Path, threads: int = 0, batch_size: int = 64,
                 providers: list[str] | None = None, expected_sha256: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.meta = ModelMetadata.read(self.model_dir)
        onnx_path = self.model_dir / self.meta.onnx_file
        if not onnx_path.is_file():
            raise ModelError(onnx_path, "ONNX file named in model.json is missing")
        digest = sha256_file(onnx_path)
        if digest != self.meta.onnx_sha256:
            raise ModelError(
                onnx_path,
                f"sha256 {digest[:12]}... differs from {self.meta.onnx_sha256[:12]}... recorded in "
                "model.json: the file was replaced or corrupted; export the model again",
            )
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ModelError(
                onnx_path,
                f"sha256 {digest[:12]}... differs from encoder.model_sha256 {expected_sha256[:12]}... pinned in the "
                "configuration: not the model this configuration was made for",
            )
        self.sha256 = digest
        self.batch_size = int(batch_size)
        self.dim = int(self.meta.embed_dim)
        suffix = "" if self.meta.precision == "fp32" else f"/{self.meta.precision}"
        self.id = f"clip-onnx/{self.meta.arch}/{digest[:12]}{suffix}"

        so = session_options(self.meta.precision, threads)
        self.providers = providers or available_providers()
        try:
            self.session, self.provider = create_session(onnx_path, so, self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise ModelError(onnx_path, f"onnxruntime cannot load the model: {e}") from None
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """Crops uint8 ``(N, S, S)`` -> network input float32 ``(N, 3, H, H)`` (see ``clip_preprocess``)."""
        m = self.meta
        return clip_preprocess(crops, m.image_size, m.mean, m.std, m.interpolation)

    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        """Un-normalised image-tower output, float32 ``(N, D)`` (for export checks)."""
        c = np.asarray(crops)
        if c.ndim != 3:
            raise ValueError(f"{self.id}: expected crops (N, S, S), got shape {c.shape}")
        out = np.empty((len(c), self.dim), dtype=np.float32)
        for i in range(0, len(c), self.batch_size):
            x = self.preprocess(c[i:i + self.batch_size])
            out[i:i + len(x)] = self.session.run([self._output], {self._input: x})[0]
        return out

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed crops.

        Parameters
        ----------
        crops : np.ndarray
            uint8 ``(N, S, S)`` brightness-normalised grey crops (any S; resized to the network input).

        Returns
        -------
        np.ndarray
            float32 ``(N, D)``, rows L2-normalised. ``N = 0`` gives ``(0, D)``.

        Raises
        ------
        ValueError
            ``crops`` is not 3-D.
        """
        return l2_normalise(self.embed_raw(crops))
