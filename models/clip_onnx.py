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
from stm_agent.models.cache import EmbeddingCache, crop_digest, default_cache
from stm_agent.models.metadata import ModelMetadata, model_file_sha256
from stm_agent.models.preprocess import clip_preprocess


#: Model precisions an export can hold (``OUT/`` = fp32, ``OUT/<precision>/`` the others).
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
#: ``precision: auto`` on a CPU: int8 of the fused graph with calibrated (static) activation scales,
#: the fastest variant measured with recognition unchanged (docs/encoders.md, issue 14); an export
#: without calibration has only ``int8-dynamic``, used then. On CUDA: fp32.
CPU_DEFAULT_PRECISION = "int8"
CPU_FALLBACK_PRECISION = "int8-dynamic"
GPU_DEFAULT_PRECISION = "fp32"

log = logging.getLogger(__name__)


def available_providers() -> list[str]:
    """onnxruntime execution providers to use, best first: CUDA when available, then CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have] or have


def create_session(path: str | Path, sess_options=None, providers: list[str] | None = None,
                   disabled_optimizers: list[str] | None = None):
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
    disabled_optimizers : list[str], optional
        onnxruntime graph optimisers not to run (see :func:`disabled_optimizers`).

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
    kw = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
    if "CUDAExecutionProvider" not in wanted:
        session = ort.InferenceSession(os.fspath(path), sess_options=sess_options, providers=wanted, **kw)
        return session, session.get_providers()[0]
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN from the nvidia-* wheels
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
    ort.set_default_logger_severity(4)  # a missing CUDA library is an ERROR line in onnxruntime's log
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=sess_options, providers=wanted, **kw)
    finally:
        ort.set_default_logger_severity(2)
    used = session.get_providers()[0]
    if used != "CUDAExecutionProvider":
        log.info("onnxruntime: the CUDA execution provider is not usable here (no GPU, or no CUDA 12/13 and "
                 "cuDNN 9 libraries: pip install \"stm-agent[gpu]\"); running on %s", used)
    return session, used


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads counted once), at least 1.

    Reads ``/sys/devices/system/cpu/cpu<N>/topology`` for the CPUs of ``os.sched_getaffinity``;
    falls back to the CPU count where that is not available.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        t = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((t / "physical_package_id").read_text().strip(), (t / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def session_options(precision: str = "fp32", threads: int = 0):
    """onnxruntime ``SessionOptions`` for a model of ``precision``.

    ``threads`` intra-op threads (0 = :func:`physical_cores`: on a busy 2-core PC more threads than
    cores only adds contention), one inter-op thread, sequential execution (the ViT is a chain:
    parallel execution adds scheduling cost for nothing), graph optimisation level ALL, no
    spin-waiting of idle threads.

    fp16 graphs get ``ORT_ENABLE_EXTENDED`` instead of ``ORT_ENABLE_ALL``: with onnxruntime 1.2x the
    layout optimisations of level ALL crash (segmentation fault) on the Cast-wrapped fp16 graph
    written by ``onnxruntime.transformers.float16``; EXTENDED keeps the fusions and works.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads) if threads > 0 else physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if precision == "fp16"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # Idle threads sleep instead of spinning: the microscope PC runs the acquisition software too.
    # Measured on 2 shared cores (int8, batch 32): x1.2 crops/s (median of per-repeat ratios) and
    # 22 % less CPU time than with spinning.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def disabled_optimizers(precision: str) -> list[str]:
    """onnxruntime graph optimisers to switch off for a model of ``precision``.

    Calibrated int8: constant folding would multiply each constant activation scale into its
    weight scale, and the ``MatMulInteger -> Cast -> Mul`` chain then no longer matches
    onnxruntime's ``MatMulIntegerToFloat`` fusion (measured: ~10 % slower than dynamic int8 with
    folding, on par without). The graph is already folded and fused offline by the export.
    """
    return ["ConstantFolding"] if precision == "int8" else []


def model_variant(model_dir: str | Path, precision: str) -> Path | None:
    """Folder of the ``precision`` variant of the export that ``model_dir`` belongs to, or ``None``.

    ``model_dir`` may be the export's root (fp32) or one of its variant sub-folders.
    """
    d = Path(model_dir)
    root = d.parent if d.name in PRECISIONS[1:] and (d.parent / "model.json").is_file() else d
    cand = root if precision == "fp32" else root / precision
    return cand if (cand / "model.json").is_file() else None


class ClipOnnxEncoder:
    """CLIP image encoder from an exported model folder (``model.onnx`` + ``model.json``).

    Parameters
    ----------
    model_dir : str | Path
        Folder written by ``stm-agent models export`` (or :func:`models.export.export_clip`): the
        export's root (fp32) or a variant sub-folder (``int8/``, ...).
    threads : int
        onnxruntime intra-op threads; 0 = the physical cores (:func:`physical_cores`).
    batch_size : int
        Crops per ``session.run`` call (bounds the memory of the 224x224 input tensors:
        64 crops = 38 MB of float32).
    providers : list[str] | None
        onnxruntime execution providers; default :func:`available_providers`.
    precision : {"auto", "fp32", "fp16", "int8", "int8-dynamic", "as-is"}
        Variant of the export to load. ``auto`` with the export's root folder: fp32 when the CUDA
        provider is actually in use, else :data:`CPU_DEFAULT_PRECISION` (calibrated int8) when the
        export has it, else ``int8-dynamic``, else fp32 (with a warning). ``auto`` with a variant
        sub-folder, or ``as-is``: exactly the folder given. A named precision must exist in the
        export (``ModelError`` otherwise).
    cache : EmbeddingCache | bool | None
        Embeddings of crops already seen (key: this encoder's ``id`` + crop content hash).
        ``None``/``True``: the process-wide :func:`models.cache.default_cache`; ``False``: none.
    expected_sha256 : str | None
        sha256 (hex) the ONNX file must have (``encoder.model_sha256``); None = trust ``model.json``.
        With ``precision: auto`` the variant of the export with that sha256 is loaded.

    Attributes
    ----------
    id : str
        ``"clip-onnx/<arch>/<onnx sha256[:12]>"``; with a non-fp32 precision the precision is
        appended (``.../int8``), so cached reference embeddings never mix models.
    meta : ModelMetadata
        The loaded model's ``model.json``.
    precision : str
        Precision of the loaded model.
    provider : str
        Execution provider the session actually uses (see :func:`create_session`).
    dim : int
        Embedding length D (512 for ViT-B-32).

    Raises
    ------
    ModelError
        Missing/invalid ``model.json``, missing ONNX file, sha256 of the ONNX file different from
        the one in ``model.json`` (file replaced or corrupted) or from ``expected_sha256`` (the
        pin of ``encoder.model_sha256``), a requested precision the export lacks, or onnxruntime
        cannot load it.
    ValueError
        ``batch_size < 1`` or an unknown ``precision``.
    """

    name = "clip"

    def __init__(self, model_dir: str | Path, threads: int = 0, batch_size: int = 64,
                 providers: list[str] | None = None, precision: str = "auto",
                 cache: EmbeddingCache | bool | None = None, expected_sha256: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in ("auto", "as-is", *PRECISIONS):
            raise ValueError(f"precision {precision!r} unknown; allowed: auto, as-is, {', '.join(PRECISIONS)}")
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        self.providers = list(providers or available_providers())
        self.requested_precision = precision
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        given = Path(model_dir)
        given_meta = ModelMetadata.read(given)  # a clear error for a wrong folder, whatever the precision
        pinned = self._pinned_variant(given) if precision == "auto" and self.expected_sha256 else None
        if pinned is not None:  # the configuration pins one model of the export: that one
            self._load(pinned, self.providers)
        elif precision == "as-is" or (precision == "auto" and given_meta.precision != "fp32"):
            self._load(given, self.providers)
        else:
            gpu = "CUDAExecutionProvider" in self.providers
            want = precision if precision != "auto" else (GPU_DEFAULT_PRECISION if gpu else CPU_DEFAULT_PRECISION)
            self._load(self._variant(given, want, precision == "auto"), self.providers)
            if precision == "auto" and gpu and self.provider != "CUDAExecutionProvider":
                # CUDA listed but not usable (no device, driver or libraries): the session runs on the CPU
                log.info("%s: CUDA execution provider not usable, running on %s with the CPU precision %s",
                         given, self.provider, CPU_DEFAULT_PRECISION)
                cpu = [p for p in self.providers if p != "CUDAExecutionProvider"] or ["CPUExecutionProvider"]
                self._load(self._variant(given, CPU_DEFAULT_PRECISION, True), cpu)
        if cache is None or cache is True:
            self.cache: EmbeddingCache | None = default_cache()
        else:  # an EmbeddingCache (even an empty one: len() 0) or False
            self.cache = cache if isinstance(cache, EmbeddingCache) else None

    def _pinned_variant(self, given: Path) -> Path | None:
        """The variant folder of the export whose ``model.json`` records the pinned sha256."""
        for prec in PRECISIONS:
            d = model_variant(given, prec)
            if d is not None:
                try:
                    if ModelMetadata.read(d).onnx_sha256.lower() == self.expected_sha256:
                        return d
                except ModelError:
                    continue
        return None

    @staticmethod
    def _variant(given: Path, want: str, lenient: bool) -> Path:
        d = model_variant(given, want)
        if d is not None:
            return d
        if lenient and want == CPU_DEFAULT_PRECISION and model_variant(given, CPU_FALLBACK_PRECISION):
            log.info("%s: no calibrated int8 variant, using int8-dynamic (export with --calibrate-sxm)", given)
            return model_variant(given, CPU_FALLBACK_PRECISION)
        fp32 = model_variant(given, "fp32")
        if lenient and fp32 is not None:
            log.warning("%s: no %s variant in this export, using fp32 (re-export with --int8 --calibrate-sxm for "
                        "the faster CPU default)", given, want)
            return fp32
        if lenient:
            return given
        raise ModelError(given, f"precision {want!r} requested but the export has no {want} model; "
                                f"export it (`stm-agent models export ... --{want}`) or set encoder.precision: auto")

    def _load(self, model_dir: Path, providers: list[str]) -> None:
        self.model_dir = model_dir
        self.meta = ModelMetadata.read(model_dir)
        onnx_path = model_dir / self.meta.onnx_file
        if not onnx_path.is_file():
            raise ModelError(onnx_path, "ONNX file named in model.json is missing")
        digest = model_file_sha256(onnx_path)
        if digest != self.meta.onnx_sha256:
            raise ModelError(
                onnx_path,
                f"sha256 {digest[:12]}... differs from {self.meta.onnx_sha256[:12]}... recorded in "
                "model.json: the file was replaced or corrupted; export the model again",
            )
        self.sha256 = digest
        self.precision = self.meta.precision
        self.dim = int(self.meta.embed_dim)
        suffix = "" if self.precision == "fp32" else f"/{self.precision}"
        self.id = f"clip-onnx/{self.meta.arch}/{digest[:12]}{suffix}"
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            raise ModelError(
                onnx_path,
                f"sha256 {digest[:12]}... differs from encoder.model_sha256 {self.expected_sha256[:12]}... pinned in "
                "the configuration: not the model this configuration was made for",
            )
        so = session_options(self.precision, self.threads)
        try:
            self.session, self.provider = create_session(onnx_path, so, providers,
                                                         disabled_optimizers(self.precision))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise ModelError(onnx_path, f"onnxruntime cannot load the model: {e}") from None
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """Crops uint8 ``(N, S, S)`` -> network input float32 ``(N, 3, H, H)`` (see ``clip_preprocess``)."""
        m = self.meta
        return clip_preprocess(crops, m.image_size, m.mean, m.std, m.interpolation)

    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        """Un-normalised image-tower output, float32 ``(N, D)``.

        Crops found in the cache are not recomputed; the others run through the network in
        batches of ``batch_size`` and are stored.
        """
        c = np.asarray(crops)
        if c.ndim != 3:
            raise ValueError(f"{self.id}: expected crops (N, S, S), got shape {c.shape}")
        out = np.empty((len(c), self.dim), dtype=np.float32)
        todo = np.arange(len(c))
        keys: list[bytes] = []
        if self.cache is not None and len(c):
            keys = [crop_digest(x) for x in c]
            found = self.cache.lookup(self.id, keys)
            hit = np.array([f is not None for f in found])
            if hit.any():
                out[hit] = np.stack([f for f in found if f is not None])
            todo = np.flatnonzero(~hit)
        for i in range(0, len(todo), self.batch_size):
            idx = todo[i:i + self.batch_size]
            x = self.preprocess(c[idx])
            out[idx] = self.session.run([self._output], {self._input: x})[0]
        if self.cache is not None and len(todo):
            self.cache.store(self.id, [keys[i] for i in todo], out[todo])
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
