"""Export open_clip's image tower to ONNX for the runtime encoder (:mod:`models.clip_onnx`).

Needs the optional extra ``stm-agent[export]`` (torch, open_clip_torch, onnx, onnxscript); the
agent itself never imports torch. Usage::

    stm-agent models export --arch ViT-B-32 --pretrained openai --out models/vitb32 [--fp16] [--no-int8]
                            [--calibrate-sxm SCANS_DIR]

Layout written (each folder is a complete model folder for ``encoder.model_dir``)::

    OUT/model.onnx, OUT/model.json                  fp32, fused (always: the reference of the checks)
    OUT/int8-dynamic/model.onnx, model.json         int8, activation scales per batch (default on)
    OUT/int8/model.onnx, model.json                 int8, activation scales calibrated on crops cut
                                                    from .sxm scans (--calibrate-sxm): the CPU default
    OUT/fp16/...                                    with --fp16: fp16 weights, fp32 input/output

How (issue 14, measured in docs/encoders.md): the attention blocks are rewritten in the
query/key/value form that ``onnxruntime.transformers`` recognises, exported with the TorchScript
exporter and fused offline (12 ``Attention``, 24 ``SkipLayerNormalization``, 12 ``BiasGelu`` for
ViT-B-32); int8 quantises that fused graph (``QAttention`` + ``MatMulInteger``, not the patch
convolution).

Checks (in the returned report and in each ``model.json`` under ``checks``): the fp32 ONNX
output against torch eager (the unmodified open_clip model) on the same preprocessed crops (max abs
difference of the raw embedding, and the smallest cosine), and for the other precisions the cosine
of each crop's embedding to its fp32 ONNX embedding (min and mean).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stm_agent.agent.errors import ModelError
from stm_agent.models.metadata import ModelMetadata, model_file_sha256

OPSET = 17  # >= 17 (LayerNormalization); TorchScript exporter (its graph is what the fusions expect)
OPSET_DYNAMO = 18  # the torch dynamo exporter's native opset (exporter="dynamo")
WEIGHTS_HELP = (
    "Weights cannot be downloaded on this machine. Either (a) run `stm-agent models export` on a "
    "machine with internet (it downloads the open_clip weights from the Hugging Face hub into "
    "~/.cache/huggingface), then copy the OUT folder here; or (b) download the checkpoint "
    "(e.g. https://huggingface.co/timm/vit_base_patch32_clip_224.openai, file "
    "open_clip_pytorch_model.bin) and pass its path: --pretrained /path/to/open_clip_pytorch_model.bin"
)


@dataclass
class ExportReport:
    """What :func:`export_clip` wrote and measured.

    Attributes
    ----------
    model_dirs : dict[str, Path]
        precision (``fp32``/``fp16``/``int8``) -> model folder.
    metadata : dict[str, ModelMetadata]
        precision -> its ``model.json`` contents.
    n_check_crops : int
        Crops used for the checks.
    check_source : str
        ``"given"`` (real crops passed in) or ``"synthetic"`` (none passed: a fixed random batch).
    max_abs_diff_torch : float
        Largest |ONNX fp32 - torch| over all raw embedding values of the check crops.
    min_cosine_torch : float
        Smallest cosine between ONNX fp32 and torch embeddings of a crop.
    cosine_vs_fp32 : dict[str, dict[str, float]]
        For fp16/int8: ``{"min": .., "mean": ..}`` cosine to the fp32 ONNX embedding.
    file_bytes : dict[str, int]
        precision -> size of the ONNX file.
    fused : dict[str, int]
        Operators fused by ``onnxruntime.transformers`` (e.g. ``{"Attention": 12, ...}``).
    """

    model_dirs: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, ModelMetadata] = field(default_factory=dict)
    n_check_crops: int = 0
    check_source: str = "synthetic"
    max_abs_diff_torch: float = float("nan")
    min_cosine_torch: float = float("nan")
    cosine_vs_fp32: dict[str, dict[str, float]] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "model_dirs": {k: str(v) for k, v in self.model_dirs.items()},
            "ids": {k: f"clip-onnx/{m.arch}/{m.onnx_sha256[:12]}" + ("" if k == "fp32" else f"/{k}")
                    for k, m in self.metadata.items()},
            "n_check_crops": self.n_check_crops,
            "check_source": self.check_source,
            "max_abs_diff_torch": self.max_abs_diff_torch,
            "min_cosine_torch": self.min_cosine_torch,
            "cosine_vs_fp32": self.cosine_vs_fp32,
            "file_bytes": self.file_bytes,
            "fused": self.fused,
        }


@contextlib.contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    """Temporarily put huggingface_hub in offline mode (no HTTP retries: fails at once)."""
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip depends on it
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _register_config(arch: str, model_cfg: dict) -> None:
    import open_clip

    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / f"{arch}.json"
        p.write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(p)


def build_model(arch: str, pretrained: str | Path | None, model_cfg: dict | None = None,
                offline: bool = False) -> tuple[Any, str, str | None]:
    """Build an open_clip model in eval mode.

    Parameters
    ----------
    arch : str
        open_clip architecture (``open_clip.list_models()``), or a new name when ``model_cfg`` is given.
    pretrained : str | Path | None
        ``None``/``"none"``: random weights (tests, benchmarks). An existing file: a local
        checkpoint (works offline). Otherwise an open_clip tag for ``arch`` (downloaded or taken
        from the Hugging Face cache).
    model_cfg : dict | None
        An open_clip model config (``{"embed_dim":.., "vision_cfg":.., "text_cfg":..}``) registered
        under ``arch`` first (e.g. a tiny test model).
    offline : bool
        Do not try the network for a named tag (fail at once when it is not cached).

    Returns
    -------
    (model, pretrained_label, checkpoint_sha256)

    Raises
    ------
    ModelError
        Unknown architecture or tag, or weights that cannot be had (the message says where to get
        them and how to export on a machine with internet).
    """
    import open_clip

    if model_cfg is not None:
        _register_config(arch, model_cfg)
    if arch not in open_clip.list_models():
        raise ModelError(arch, f"unknown open_clip architecture; e.g. ViT-B-32, ViT-B-16, ViT-L-14 "
                               f"({len(open_clip.list_models())} known: open_clip.list_models())")
    ckpt_sha = None
    if pretrained is None or str(pretrained).lower() == "none":
        label, arg = "none", None
    elif Path(pretrained).is_file():
        label, arg = f"file:{Path(pretrained).name}", str(pretrained)
        ckpt_sha = model_file_sha256(pretrained)
    else:
        tag = str(pretrained)
        if Path(tag).suffix in (".pt", ".bin", ".pth", ".safetensors") or "/" in tag:
            raise ModelError(tag, "checkpoint file not found")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise ModelError(tag, f"not a pretrained tag of {arch}; known: {', '.join(tags) or 'none'}")
        label, arg = tag, tag
    try:
        with _hf_offline(offline):
            model = open_clip.create_model(arch, pretrained=arg, device="cpu")
    except ModelError:
        raise
    except Exception as e:
        if arg is not None and label == arg:
            raise ModelError(f"{arch}/{label}", f"weights not available ({type(e).__name__}: "
                                                f"{str(e)[:200]}). {WEIGHTS_HELP}") from None
        raise ModelError(str(pretrained) if pretrained else arch, f"cannot build the model: {e}") from None
    model.eval()
    return model, label, ckpt_sha


def _preprocess_cfg(model: Any) -> dict[str, Any]:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    from stm_agent.models.preprocess import OPENAI_MEAN, OPENAI_STD

    return {
        "image_size": int(size),
        "mean": [float(v) for v in cfg.get("mean", OPENAI_MEAN)],
        "std": [float(v) for v in cfg.get("std", OPENAI_STD)],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "resize_mode": str(cfg.get("resize_mode", "shortest")),
    }


def _torch_embed(model: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(model.encode_image(torch.from_numpy(x[i:i + batch])).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _onnx_embed(path: Path, x: np.ndarray, precision: str = "fp32") -> np.ndarray:
    import onnxruntime as ort

    from stm_agent.models.clip_onnx import disabled_optimizers, session_options

    so = session_options(precision)
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(precision))
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x})[0].astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


class _ImageTower:
    """Module wrapper: ``image (N,3,H,W) -> encode_image(image)`` (un-normalised), for export."""

    def __new__(cls, model: Any):
        import torch

        class Tower(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, image):
                return self.m.encode_image(image)

        return Tower(model).eval()


def _fusable_attention(mha: Any) -> Any:
    """The same attention as ``torch.nn.MultiheadAttention`` (batch first, no mask), written as
    separate query/key/value ``Linear`` layers, ``view + permute`` per head, ``softmax(q k^T /
    sqrt(d)) v``: the pattern of Hugging Face's ViT that ``onnxruntime.transformers`` fuses into one
    ``Attention`` node (and ``quantize_dynamic`` into ``QAttention``). Weights are copied from
    ``mha.in_proj_weight`` (rows q | k | v) and ``mha.out_proj``; the output is equal to the
    original to float rounding (checked against torch in :func:`export_clip`).
    """
    import math

    import torch

    class FusableAttention(torch.nn.Module):
        def __init__(self, m: torch.nn.MultiheadAttention):
            super().__init__()
            d_model, self.h = m.embed_dim, m.num_heads
            self.d = d_model // self.h
            self.batch_first = bool(m.batch_first)
            w = m.in_proj_weight.detach()
            b = m.in_proj_bias.detach() if m.in_proj_bias is not None else torch.zeros(3 * d_model)
            self.query, self.key, self.value = (torch.nn.Linear(d_model, d_model) for _ in range(3))
            for i, lin in enumerate((self.query, self.key, self.value)):
                lin.weight.data.copy_(w[i * d_model:(i + 1) * d_model])
                lin.bias.data.copy_(b[i * d_model:(i + 1) * d_model])
            self.out = torch.nn.Linear(d_model, d_model)
            self.out.weight.data.copy_(m.out_proj.weight.detach())
            if m.out_proj.bias is not None:
                self.out.bias.data.copy_(m.out_proj.bias.detach())
            else:
                self.out.bias.data.zero_()

        def _heads(self, x):
            return x.view(x.size(0), x.size(1), self.h, self.d).permute(0, 2, 1, 3)

        def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None, **kw):
            if attn_mask is not None or kw.get("key_padding_mask") is not None:
                raise ValueError("masked attention is not exported (the image tower has no mask)")
            x = q_x if self.batch_first else q_x.transpose(0, 1)
            q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
            p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d), dim=-1)
            c = torch.matmul(p, v).permute(0, 2, 1, 3).contiguous()
            y = self.out(c.view(c.size(0), c.size(1), self.h * self.d))
            return (y if self.batch_first else y.transpose(0, 1)), None

    return FusableAttention(mha).eval()


def make_fusable(model: Any) -> tuple[int, int, int]:
    """Swap every ``nn.MultiheadAttention`` of the image tower for :func:`_fusable_attention`.

    Returns ``(n_swapped, num_heads, hidden_size)`` (``(0, 0, 0)`` when the tower has none, e.g.
    open_clip's custom blocks: exported as they are, without attention fusion).
    """
    import torch

    n, heads, hidden = 0, 0, 0
    for mod in list(model.visual.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention) and child._qkv_same_embed_dim:
                heads, hidden = child.num_heads, child.embed_dim
                setattr(mod, name, _fusable_attention(child))
                n += 1
    return n, heads, hidden


def _export_onnx(model: Any, image_size: int, path: Path, exporter: str = "torchscript") -> None:
    """Write the image tower to ``path`` (dynamic batch axis ``batch``, one file).

    ``torchscript``: the TorchScript-based exporter, opset 17 (whose graph
    ``onnxruntime.transformers`` fuses); ``dynamo``: ``torch.export``, opset 18 (no fusion).
    """
    import torch

    tower = _ImageTower(model)
    dummy = torch.zeros(2, 3, image_size, image_size)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                tower, (dummy,), str(path), input_names=["image"], output_names=["embedding"],
                opset_version=OPSET_DYNAMO, dynamo=True, external_data=False,
                dynamic_shapes={"image": {0: batch}}, optimize=True, verbose=False,
            )
        return
    import warnings

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            tower, (dummy,), str(path), input_names=["image"], output_names=["embedding"],
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
        )


def _fuse(src: Path, dst: Path, num_heads: int, hidden: int) -> dict[str, int]:
    """``onnxruntime.transformers.optimizer`` (model type ``vit``): Attention, SkipLayerNormalization,
    BiasGelu fusions, written offline so that every session loads the fused graph.

    Returns the counts of fused operators (zeros omitted).
    """
    import logging

    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    m = optimizer.optimize_model(str(src), model_type="vit", num_heads=num_heads, hidden_size=hidden,
                                 opt_level=0, use_gpu=False)
    m.save_model_to_file(str(dst))
    return {k: int(v) for k, v in m.get_fused_operator_statistics().items() if v}


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(src))
    m16 = convert_float_to_float16(m, keep_io_types=True, disable_shape_infer=False)
    # the converter appends the input Cast nodes at the end of the node list: sort topologically
    import onnx_ir as ir

    model = ir.from_proto(m16)
    model.graph.sort()
    onnx.save(ir.to_proto(model), str(dst))


#: Operators quantised to int8. Not ``Conv`` (the 32x32 patch embedding): onnxruntime's
#: ``ConvInteger`` is slower than the float convolution (measured: 23 % of the int8 run time).
INT8_OPS = ["MatMul", "Attention", "Gemm"]


def _int8(src: Path, dst: Path, per_channel: bool = False) -> None:
    """Dynamic int8: int8 weights, activations quantised per batch at run time (``MatMulInteger``,
    ``QAttention``; u8 x s8, which AVX-512 VNNI / AVX-VNNI run as ``vpdpbusd``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=INT8_OPS,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _int8_calibrated(src: Path, dst: Path, calibration: np.ndarray, batch: int = 16) -> int:
    """Static int8: the dynamic int8 graph ``src`` with every activation scale fixed by calibration.

    Each ``DynamicQuantizeLinear`` (which computes the uint8 scale and zero point of its input from
    that batch's min/max) becomes a ``QuantizeLinear`` with constants from the min/max of that input
    over the ``calibration`` network inputs (float32 ``(N, 3, H, W)``): the same arithmetic as
    onnxruntime's dynamic quantisation (scale = (max(hi, 0) - min(lo, 0)) / 255), the same
    ``QAttention`` / ``MatMulInteger`` kernels, no per-batch reductions, and an embedding that no
    longer depends on the other crops of the batch. Values beyond the calibrated range saturate.

    Returns the number of activation scales fixed.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    dql = [n for n in m.graph.node if n.op_type == "DynamicQuantizeLinear"]
    names = [n.input[0] for n in dql]
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    have = {o.name for o in probe.graph.output}
    for nm in dict.fromkeys(names):
        if nm not in have:
            probe.graph.output.append(helper.make_tensor_value_info(nm, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    lo = np.full(len(names), np.inf)
    hi = np.full(len(names), -np.inf)
    for i in range(0, len(calibration), batch):
        outs = sess.run(names, {sess.get_inputs()[0].name: calibration[i:i + batch]})
        lo = np.minimum(lo, [float(o.min()) for o in outs])
        hi = np.maximum(hi, [float(o.max()) for o in outs])
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / 255.0, np.finfo(np.float32).tiny)
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    nodes = []
    for n in m.graph.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        k = names.index(n.input[0])
        m.graph.initializer.extend([
            numpy_helper.from_array(np.array(scale[k], np.float32), n.output[1]),
            numpy_helper.from_array(np.array(zp[k], np.uint8), n.output[2]),
        ])
        nodes.append(helper.make_node("QuantizeLinear", [n.input[0], n.output[1], n.output[2]], [n.output[0]],
                                      name=(n.name or n.output[0]) + "_calibrated"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst))
    return len(dql)


def export_clip(
    arch: str = "ViT-B-32",
    pretrained: str | Path | None = None,
    out_dir: str | Path = "clip-model",
    fp16: bool = False,
    int8: bool = True,
    check_crops: np.ndarray | None = None,
    model_cfg: dict | None = None,
    offline: bool = False,
    overwrite: bool = False,
    calibration_crops: np.ndarray | None = None,
    exporter: str = "torchscript",
    fuse: bool = True,
) -> ExportReport:
    """Export open_clip's image tower to ONNX, fuse it for onnxruntime, quantise it, and check it.

    Steps: the tower's ``nn.MultiheadAttention`` blocks are rewritten as the equivalent
    query/key/value form (:func:`make_fusable`), exported with the TorchScript exporter (opset 17),
    and fused offline by ``onnxruntime.transformers.optimizer`` (``Attention``,
    ``SkipLayerNormalization``, ``BiasGelu``); ``int8`` quantises that fused graph (``QAttention`` +
    ``MatMulInteger``), with per-batch activation scales (``int8-dynamic``) and, given
    ``calibration_crops``, with calibrated fixed ones (``int8``).

    Parameters
    ----------
    arch : str
        open_clip architecture, default ``"ViT-B-32"`` (UniMR's encoder).
    pretrained : str | Path | None
        Weights: ``None``/``"none"`` (random), a local checkpoint path, or a tag (``"openai"``,
        ``"laion2b_s34b_b79k"`` ...). See :func:`build_model`.
    out_dir : str | Path
        Output folder (created). ``fp16/``, ``int8-dynamic/``, ``int8/`` sub-folders for the variants.
    fp16 : bool
        Also write the fp16-weight variant (for GPUs; slower than fp32 on CPUs).
    int8 : bool
        Also write the int8 variants: ``int8-dynamic`` always, ``int8`` (static, calibrated: the
        runtime's CPU default) when ``calibration_crops`` are given.
    check_crops : np.ndarray | None
        uint8 ``(N, S, S)`` (or a list of 2-D crops) real STM crops for the checks; ``None`` uses
        8 fixed random crops (``check_source = "synthetic"``).
    model_cfg : dict | None
        Custom open_clip config registered as ``arch`` (tests use a tiny model).
    offline : bool
        Fail at once (no HTTP retries) when a named tag is not cached.
    overwrite : bool
        Replace an existing ``model.onnx`` in ``out_dir``.
    calibration_crops : np.ndarray | None
        uint8 ``(N, S, S)`` crops (or a list of 2-D crops) cut from ``.sxm`` scans, never from a
        set used to score recognition: the activation ranges of ``int8/`` (:func:`_int8_calibrated`).
    exporter : {"torchscript", "dynamo"}
        ``dynamo`` keeps the earlier torch.export path (opset 18; no fusion, slower).
    fuse : bool
        Run the onnxruntime transformer fusions (TorchScript exporter only).

    Returns
    -------
    ExportReport

    Raises
    ------
    ModelError
        Weights unavailable, unknown architecture/tag, existing model without ``overwrite``, or
        the export/quantization failed.
    """
    from stm_agent.models.preprocess import clip_preprocess

    if exporter not in ("torchscript", "dynamo"):
        raise ModelError(exporter, "unknown exporter; allowed: torchscript, dynamo")
    out = Path(out_dir)
    if (out / "model.onnx").exists() and not overwrite:
        raise ModelError(out, "already holds model.onnx; choose another --out or pass overwrite")
    import open_clip
    import torch

    model, label, ckpt_sha = build_model(arch, pretrained, model_cfg=model_cfg, offline=offline)
    pp = _preprocess_cfg(model)
    if pp["interpolation"] not in ("bicubic", "bilinear") or pp["resize_mode"] != "shortest":
        raise ModelError(arch, f"preprocessing {pp} is not supported by the runtime (needs bicubic/"
                               "bilinear and resize_mode 'shortest')")
    report = ExportReport()
    if check_crops is None:
        rng = np.random.default_rng(0)
        check_crops = rng.integers(0, 256, size=(8, 64, 64), dtype=np.uint8)
        report.check_source = "synthetic"
    else:
        report.check_source = "given"
    x = clip_preprocess(check_crops, pp["image_size"], pp["mean"], pp["std"], pp["interpolation"])
    report.n_check_crops = len(x)
    ref = _torch_embed(model, x)  # the unmodified open_clip model
    embed_dim = int(ref.shape[1])
    fused: dict[str, int] = {}
    n_attn, heads, hidden = (0, 0, 0)
    if exporter == "torchscript":
        n_attn, heads, hidden = make_fusable(model)

    out.mkdir(parents=True, exist_ok=True)
    path32 = out / "model.onnx"
    try:
        with tempfile.TemporaryDirectory() as td:
            raw = Path(td) / "raw.onnx"
            _export_onnx(model, pp["image_size"], raw if (fuse and n_attn) else path32, exporter)
            if fuse and n_attn:
                fused = _fuse(raw, path32, heads, hidden)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(path32, f"ONNX export failed: {type(e).__name__}: {e}") from None
    # the dynamo exporter may leave a sidecar weight file when external_data is ignored
    if (out / "model.onnx.data").exists():
        raise ModelError(path32, "export wrote external data (model.onnx.data); single-file export expected")

    e32 = _onnx_embed(path32, x)
    report.max_abs_diff_torch = float(np.abs(e32 - ref).max()) if len(x) else 0.0
    report.min_cosine_torch = float(_cos(e32, ref).min()) if len(x) else 1.0
    report.fused = fused
    base = dict(arch=arch, pretrained=label, embed_dim=embed_dim,
                opset=OPSET if exporter == "torchscript" else OPSET_DYNAMO,
                open_clip_version=open_clip.__version__, torch_version=torch.__version__,
                checkpoint_sha256=ckpt_sha,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **pp)

    def write(prec: str, d: Path, checks: dict) -> None:
        md = ModelMetadata(onnx_sha256=model_file_sha256(d / "model.onnx"), precision=prec, checks=checks, **base)
        md.write(d)
        report.model_dirs[prec] = d
        report.metadata[prec] = md
        report.file_bytes[prec] = (d / "model.onnx").stat().st_size

    write("fp32", out, {"n_crops": len(x), "crops": report.check_source, "exporter": exporter,
                        "fused": fused, "max_abs_diff_torch": report.max_abs_diff_torch,
                        "min_cosine_torch": report.min_cosine_torch})
    calib = None
    if calibration_crops is not None and len(calibration_crops):
        calib = clip_preprocess(calibration_crops, pp["image_size"], pp["mean"], pp["std"], pp["interpolation"])
    variants = (("fp16", fp16, _fp16), ("int8-dynamic", int8, _int8),
                ("int8", int8 and calib is not None,
                 lambda s, d: n_scales.append(_int8_calibrated(out / "int8-dynamic" / "model.onnx", d, calib))))
    n_scales: list[int] = []
    for prec, enabled, fn in variants:
        if not enabled:
            continue
        d = out / prec
        if d.exists() and overwrite:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        try:
            fn(path32, d / "model.onnx")
        except Exception as e:
            raise ModelError(d / "model.onnx", f"{prec} conversion failed: {type(e).__name__}: {e}") from None
        ev = _onnx_embed(d / "model.onnx", x, prec)
        c = _cos(ev, e32)
        stats = {"min": float(c.min()), "mean": float(c.mean())} if len(c) else {"min": 1.0, "mean": 1.0}
        report.cosine_vs_fp32[prec] = stats
        checks = {"n_crops": len(x), "crops": report.check_source,
                  "cosine_vs_fp32_min": stats["min"], "cosine_vs_fp32_mean": stats["mean"]}
        if prec == "int8":
            checks["n_calibration_crops"] = len(calib)
            checks["n_activation_scales"] = n_scales[-1]
        write(prec, d, checks)
    return report


TINY_TEST_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
"""A tiny open_clip config (ViT, 2 layers, 64 px input) for fast export tests."""
