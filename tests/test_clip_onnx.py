"""Runtime CLIP encoder and its preprocessing, on real STM crops (tiny exported model)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stm_agent.agent.config import EncoderConfig, NormaliseConfig
from stm_agent.agent.errors import ConfigError, ModelError
from stm_agent.models.clip_onnx import ClipOnnxEncoder
from stm_agent.models.preprocess import clip_preprocess, resample_matrix
from stm_agent.models.registry import make_encoder, make_encoders


def _crop_files(labelled_dir: Path) -> list[Path]:
    files = sorted((labelled_dir / "crops").rglob("*.jpg")) + sorted((labelled_dir / "crops").rglob("*.png"))
    assert len(files) >= 40, "expected the real crops of ../shared/data/labelled/crops"
    return files


@pytest.fixture(scope="module")
def grey_crops(labelled_dir) -> list[np.ndarray]:
    """Real STM crops (42-136 px, some non-square) as grey uint8 arrays."""
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in _crop_files(labelled_dir)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, grey_crops, sxm_dir) -> Path:
    """A tiny exported model: fp32, int8-dynamic and int8 calibrated on crops cut from .sxm scans."""
    for mod in ("torch", "open_clip", "onnx"):
        pytest.importorskip(mod, reason='exporting the test model needs the export extra: pip install -e ".[test,export]"')
    from stm_agent.agent.cli_models import calibration_crops
    from stm_agent.models.export import TINY_TEST_CONFIG, export_clip

    out = tmp_path_factory.mktemp("tiny")
    export_clip("tiny-test-runtime", None, out, check_crops=grey_crops[:8], model_cfg=TINY_TEST_CONFIG,
                calibration_crops=np.stack(calibration_crops(sxm_dir, per_scan=2, limit=16)))
    return out


def test_preprocess_matches_open_clip_transform(grey_crops):
    """Our numpy preprocessing equals open_clip's PIL/torchvision transform on every real crop.

    Pillow's fixed-point bicubic is reproduced exactly, so the tolerance is float32 rounding of
    (v/255 - mean)/std (~1e-6); OpenCV's INTER_CUBIC is shown to be NOT equivalent (a = -0.75, no
    antialias): a measured max difference of several grey levels.
    """
    open_clip = pytest.importorskip("open_clip", reason='needs the export extra: pip install -e ".[test,export]"')
    from PIL import Image

    _, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    ours = clip_preprocess(grey_crops)
    ref = np.stack([pre(Image.fromarray(g, "L")).numpy() for g in grey_crops])
    assert ours.shape == ref.shape == (len(grey_crops), 3, 224, 224)
    assert np.abs(ours - ref).max() < 1e-5
    # grey -> identical R, G, B up to the per-channel mean/std
    std = np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    mean = np.array([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    v = ours[0] * std + mean
    assert np.allclose(v[0], v[1], atol=1e-5) and np.allclose(v[0], v[2], atol=1e-5)
    sq = [g for g in grey_crops if g.shape[0] == g.shape[1]][0]
    cv = cv2.resize(sq, (224, 224), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    pil = np.asarray(Image.fromarray(sq, "L").resize((224, 224), Image.BICUBIC), dtype=np.float64)
    assert np.abs(cv - pil).max() >= 1.0  # why OpenCV's resize is not used


def test_resample_rows_sum_to_one():
    for n_in, n_out in ((64, 224), (300, 224), (224, 224)):
        w = resample_matrix(n_in, n_out)
        assert w.shape == (n_out, n_in)
        assert np.allclose(w.sum(axis=1), 1.0, atol=1e-5)


def test_embeddings_normalised_deterministic_batch_independent(tiny_model, grey_crops):
    crops = np.stack([cv2.resize(g, (64, 64), interpolation=cv2.INTER_AREA) for g in grey_crops[:20]])
    a = ClipOnnxEncoder(tiny_model, batch_size=64, cache=False).embed(crops)
    b = ClipOnnxEncoder(tiny_model, batch_size=3, threads=1, cache=False).embed(crops)
    assert a.dtype == np.float32 and a.shape == (20, 32)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() < 1e-5
    enc = ClipOnnxEncoder(tiny_model, cache=False)
    assert np.array_equal(enc.embed(crops), enc.embed(crops))
    assert enc.embed(crops[:0]).shape == (0, 32)
    # different objects give different embeddings (not a constant output)
    assert (a @ a.T)[np.triu_indices(20, 1)].min() < 0.9999


def test_id_and_sha_mismatch(tiny_model, tmp_path):
    enc = ClipOnnxEncoder(tiny_model, precision="fp32")
    meta = json.loads((tiny_model / "model.json").read_text())
    assert enc.id == f"clip-onnx/tiny-test-runtime/{meta['onnx_sha256'][:12]}"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((tiny_model / "model.onnx").read_bytes() + b"\0")
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="sha256"):
        ClipOnnxEncoder(bad)
    with pytest.raises(ModelError, match="model.json"):
        ClipOnnxEncoder(tmp_path)  # a folder without model.json
    meta.pop("embed_dim")
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="embed_dim"):
        ClipOnnxEncoder(bad)


def test_registry(tiny_model):
    norm = NormaliseConfig(size_px=64)
    clip = make_encoder(EncoderConfig(name="clip", model_dir=tiny_model), norm)
    assert clip.id.startswith("clip-onnx/")
    assert make_encoder(EncoderConfig(name="zernike"), norm).id.startswith("zernike/v1/deg8")
    assert make_encoder(EncoderConfig(name="pixel"), norm).id == "pixel/v1/size64"
    with pytest.raises(ConfigError, match="model_dir"):
        make_encoder(EncoderConfig(name="clip"), norm)
    assert set(make_encoders(EncoderConfig(name="auto", model_dir=tiny_model), norm)) == {"pixel", "clip"}
    assert set(make_encoders(EncoderConfig(name="auto"), norm)) == {"pixel", "zernike"}


def test_model_sha256_pinned_in_the_config(tiny_model):
    """Issue 15: model.json proves integrity only; encoder.model_sha256 pins the model itself."""
    digest = json.loads((tiny_model / "model.json").read_text())["onnx_sha256"]
    norm = NormaliseConfig(size_px=64)
    assert make_encoder(EncoderConfig(name="clip", model_dir=tiny_model, model_sha256=digest), norm).sha256 == digest
    with pytest.raises(ModelError, match="pinned"):
        make_encoder(EncoderConfig(name="clip", model_dir=tiny_model, model_sha256="0" * 64), norm)
    with pytest.raises(ValueError):
        EncoderConfig(model_sha256="not-a-sha")


def test_provider_is_read_from_the_session_and_cpu_fallback_is_quiet(tiny_model, grey_crops, capfd):
    """The provider reported is the one the session runs on. With onnxruntime-gpu (what a Linux
    x86_64 install gets) on a machine without a GPU, CUDA is listed as available but the session
    runs on the CPU, and onnxruntime's error lines about missing CUDA libraries are not printed."""
    import onnxruntime as ort

    from stm_agent.models.clip_onnx import available_providers

    enc = ClipOnnxEncoder(tiny_model)
    assert enc.provider == enc.session.get_providers()[0]
    assert enc.providers == available_providers()
    if not Path("/dev/nvidia0").exists():  # no NVIDIA GPU here (CI): the CPU, whatever is installed
        assert enc.provider == "CPUExecutionProvider"
    assert enc.embed(np.stack([cv2.resize(c, (64, 64)) for c in grey_crops[:2]])).shape == (2, enc.dim)
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "CUDA" not in err, err
    print(f"onnxruntime {ort.__version__} ({ort.get_device()}), available {ort.get_available_providers()}, "
          f"session runs on {enc.provider}")


def _crops64(grey_crops, n=12) -> np.ndarray:
    return np.stack([cv2.resize(g, (64, 64), interpolation=cv2.INTER_AREA) for g in grey_crops[:n]])


def test_precision_selection_on_cpu(tiny_model, grey_crops):
    """``auto`` runs the int8 variant on a CPU; named precisions and variant folders are honoured."""
    from stm_agent.models.clip_onnx import CPU_DEFAULT_PRECISION

    assert CPU_DEFAULT_PRECISION == "int8"
    auto = ClipOnnxEncoder(tiny_model, providers=["CPUExecutionProvider"], cache=False)
    assert auto.precision == "int8" and auto.model_dir == tiny_model / "int8" and auto.id.endswith("/int8")
    assert auto.provider == "CPUExecutionProvider"
    fp32 = ClipOnnxEncoder(tiny_model, precision="fp32", cache=False)
    assert fp32.precision == "fp32" and fp32.model_dir == tiny_model
    assert ClipOnnxEncoder(tiny_model / "int8", precision="fp32").model_dir == tiny_model  # from a variant folder
    assert ClipOnnxEncoder(tiny_model / "int8").precision == "int8"  # auto keeps a variant folder as given
    c = _crops64(grey_crops)
    cos = (auto.embed(c) * fp32.embed(c)).sum(axis=1)
    assert cos.min() > 0.99 and cos.min() < 1.0  # a different (quantised) network, close to fp32
    with pytest.raises(ModelError, match="no fp16 model"):
        ClipOnnxEncoder(tiny_model, precision="fp16")
    dyn = ClipOnnxEncoder(tiny_model, precision="int8-dynamic", cache=False)
    assert dyn.model_dir == tiny_model / "int8-dynamic" and dyn.id.endswith("/int8-dynamic")
    with pytest.raises(ValueError, match="precision 'bf16' unknown"):
        ClipOnnxEncoder(tiny_model, precision="bf16")
    enc = make_encoder(EncoderConfig(name="clip", model_dir=tiny_model, precision="fp32"), NormaliseConfig(size_px=64))
    assert enc.precision == "fp32"


def test_auto_fallbacks_without_calibrated_int8(tmp_path, grey_crops, caplog):
    """No calibration at export: auto runs int8-dynamic; no int8 at all: fp32 with a warning."""
    for mod in ("torch", "open_clip", "onnx"):
        pytest.importorskip(mod, reason='exporting the test model needs the export extra: pip install -e ".[test,export]"')
    from stm_agent.models.export import TINY_TEST_CONFIG, export_clip

    export_clip("tiny-test-noint8", None, tmp_path, check_crops=grey_crops[:2], model_cfg=TINY_TEST_CONFIG)
    assert ClipOnnxEncoder(tmp_path, providers=["CPUExecutionProvider"]).precision == "int8-dynamic"
    export_clip("tiny-test-noint8", None, tmp_path / "f", int8=False, check_crops=grey_crops[:2],
                model_cfg=TINY_TEST_CONFIG)
    with caplog.at_level("WARNING"):
        enc = ClipOnnxEncoder(tmp_path / "f", providers=["CPUExecutionProvider"])
    assert enc.precision == "fp32" and "no int8 variant" in caplog.text


def test_cuda_provider_selection_and_fallback(tiny_model, monkeypatch, caplog):
    """The GPU path without a GPU: provider order, fp32 on CUDA, CPU default when CUDA is not usable.

    (1) onnxruntime lists CUDA (mocked): CUDA is offered first, and since this onnxruntime cannot
    really create a CUDA session, the session created reports the CPU provider: the encoder sees it
    and reloads the CPU default precision (int8). (2) A session that does run on CUDA (mocked
    ``get_providers``) keeps the fp32 model.
    """
    import onnxruntime as ort

    from stm_agent.models import clip_onnx

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert clip_onnx.available_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level("INFO"):
        enc = ClipOnnxEncoder(tiny_model, cache=False)
    assert enc.provider == "CPUExecutionProvider"  # what the real session runs on
    assert enc.precision == "int8" and "CUDA execution provider not usable" in caplog.text

    seen: list[list[str]] = []
    real = ort.InferenceSession

    class CudaSession(real):  # a session that reports CUDA (runs on the CPU underneath)
        def __init__(self, path, sess_options=None, providers=None, **kw):
            seen.append(list(providers))
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kw)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", CudaSession)
    gpu = ClipOnnxEncoder(tiny_model, cache=False)
    assert seen == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert gpu.provider == "CUDAExecutionProvider" and gpu.precision == "fp32" and gpu.model_dir == tiny_model
    # explicitly asked for int8 on the GPU machine: honoured
    assert ClipOnnxEncoder(tiny_model, precision="int8", cache=False).precision == "int8"


def test_session_options_threads_sequential():
    import onnxruntime as ort

    from stm_agent.models.clip_onnx import physical_cores, session_options

    so = session_options("int8")
    assert so.intra_op_num_threads == physical_cores() >= 1 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options("fp16", threads=3).intra_op_num_threads == 3
    assert physical_cores() <= len(__import__("os").sched_getaffinity(0))


def test_embedding_cache_in_encoder(tiny_model, grey_crops):
    """A re-processed frame costs no network run; a changed crop or another model is a miss."""
    from stm_agent.models.cache import EmbeddingCache

    cache = EmbeddingCache()
    enc = ClipOnnxEncoder(tiny_model, cache=cache)
    runs: list[int] = []
    real_run = enc.session.run

    class Counting:
        def __getattr__(self, k):
            return getattr(enc.session_real, k)

        def run(self, out, feed):
            runs.append(len(next(iter(feed.values()))))
            return real_run(out, feed)

    enc.session_real, enc.session = enc.session, Counting()
    c = _crops64(grey_crops, 10)
    first = enc.embed(c)
    assert sum(runs) == 10 and cache.misses == 10
    again = enc.embed(c)  # the same frame re-processed
    assert sum(runs) == 10 and cache.hits == 10 and np.array_equal(first, again)
    c2 = c.copy()
    c2[3, 16:48, 16:48] = 255 - c2[3, 16:48, 16:48]  # one crop changed visibly (one grey level can vanish in int8)
    mixed = enc.embed(np.concatenate([c2[2:5], c[:1]]))
    assert sum(runs) == 11  # only the changed crop ran
    assert np.array_equal(mixed[[0, 2, 3]], first[[2, 4, 0]]) and not np.array_equal(mixed[1], first[3])
    other = ClipOnnxEncoder(tiny_model, precision="fp32", cache=cache)  # another model id: no sharing
    assert not np.array_equal(other.embed(c[:2]), first[:2])
    assert ClipOnnxEncoder(tiny_model, cache=False).cache is None
