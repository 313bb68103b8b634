"""Export open_clip to ONNX: tiny model (fast) and ViT-B-32 with random weights (one slower test)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

# The export needs the `export` extra (CI installs it); with `.[test]` alone these tests skip.
for _mod in ("torch", "open_clip", "onnxscript"):
    pytest.importorskip(_mod, reason='needs the export extra: pip install -e ".[test,export]"')
onnx = pytest.importorskip("onnx", reason='needs the export extra: pip install -e ".[test,export]"')

from stm_agent.agent.cli_models import models_app
from stm_agent.agent.errors import ModelError
from stm_agent.models.clip_onnx import ClipOnnxEncoder
from stm_agent.models.export import TINY_TEST_CONFIG, export_clip
from stm_agent.models.metadata import model_file_sha256


@pytest.fixture(scope="module")
def real_crops(labelled_dir) -> list[np.ndarray]:
    files = sorted(p for p in (labelled_dir / "crops").rglob("*") if p.suffix.lower() in (".jpg", ".png"))[::8]
    assert len(files) >= 10
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files]


@pytest.fixture(scope="module")
def sxm_crops(sxm_dir) -> np.ndarray:
    """Calibration crops cut from the real .sxm scans by the agent's own detection (never labelled crops)."""
    from stm_agent.agent.cli_models import calibration_crops

    crops = calibration_crops(sxm_dir, per_scan=4, limit=24)
    assert len(crops) == 24 and crops[0].dtype == np.uint8 and crops[0].shape == (64, 64)
    assert len({c.tobytes() for c in crops}) == 24  # 24 different objects
    return np.stack(crops)


def test_tiny_export_all_precisions(tmp_path, real_crops, sxm_crops):
    rep = export_clip("tiny-test-export", None, tmp_path, fp16=True, check_crops=real_crops,
                      model_cfg=TINY_TEST_CONFIG, calibration_crops=sxm_crops)
    assert rep.check_source == "given" and rep.n_check_crops == len(real_crops)
    # the rewritten attention is the same function: the fused graph equals torch (unmodified model)
    assert rep.max_abs_diff_torch < 1e-4 and rep.min_cosine_torch > 0.9999
    assert rep.fused["Attention"] == 2 and rep.fused["SkipLayerNormalization"] == 4  # 2 layers
    assert set(rep.model_dirs) == {"fp32", "fp16", "int8-dynamic", "int8"}  # int8 is on by default
    assert rep.cosine_vs_fp32["fp16"]["min"] > 0.999
    for prec in ("int8", "int8-dynamic"):
        assert 0.99 < rep.cosine_vs_fp32[prec]["min"] < 1.0  # close, yet really quantised
    checks = rep.metadata["int8"].checks
    assert checks["n_calibration_crops"] == 24 and checks["n_activation_scales"] == 2 * 4 + 1  # 4 per layer + proj
    assert max(rep.file_bytes[p] for p in ("fp16", "int8", "int8-dynamic")) < rep.file_bytes["fp32"]
    m = onnx.load(str(tmp_path / "model.onnx"))
    assert sum(n.op_type == "Attention" for n in m.graph.node) == 2
    for prec in ("int8", "int8-dynamic"):
        q = [n.op_type for n in onnx.load(str(tmp_path / prec / "model.onnx")).graph.node]
        assert q.count("QAttention") == 2 and "ConvInteger" not in q  # the patch conv stays float
        # calibrated: every activation scale is a constant; dynamic: computed per batch
        assert ("DynamicQuantizeLinear" in q) == (prec == "int8-dynamic")
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # dynamic batch axis
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["onnx_sha256"] == model_file_sha256(tmp_path / "model.onnx")
    assert meta["image_size"] == 64 and meta["embed_dim"] == 32 and meta["pretrained"] == "none"
    assert meta["interpolation"] == "bicubic" and meta["torch_version"] and meta["open_clip_version"]
    for prec in ("fp16", "int8", "int8-dynamic"):
        enc = ClipOnnxEncoder(tmp_path / prec)
        assert enc.meta.precision == prec and enc.id.endswith(f"/{prec}")
        assert enc.id == rep.to_json()["ids"][prec]
    with pytest.raises(ModelError, match="already holds"):
        export_clip("tiny-test-export", None, tmp_path, model_cfg=TINY_TEST_CONFIG)


def test_dynamo_exporter_still_works(tmp_path, real_crops):
    """exporter="dynamo" (the earlier path: opset 18, no fusion) stays selectable."""
    rep = export_clip("tiny-test-dynamo", None, tmp_path, int8=False, check_crops=real_crops[:4],
                      model_cfg=TINY_TEST_CONFIG, exporter="dynamo")
    assert rep.fused == {} and rep.max_abs_diff_torch < 1e-4
    assert rep.metadata["fp32"].opset == 18 and rep.metadata["fp32"].checks["exporter"] == "dynamo"
    with pytest.raises(ModelError, match="unknown exporter"):
        export_clip("tiny-test-dynamo", None, tmp_path / "x", model_cfg=TINY_TEST_CONFIG, exporter="jit")


def test_vit_b32_random_weights(tmp_path, real_crops):
    """The real architecture (ViT-B/32, 512-d) exports, fuses and matches torch on real crops."""
    rep = export_clip("ViT-B-32", "none", tmp_path, int8=False, check_crops=real_crops[:3])
    assert rep.max_abs_diff_torch < 1e-3 and rep.min_cosine_torch > 0.9999
    assert rep.fused["Attention"] == 12 and rep.fused["SkipLayerNormalization"] == 24
    enc = ClipOnnxEncoder(tmp_path)
    crops = np.stack([cv2.resize(c, (64, 64)) for c in real_crops[:3]])
    e = enc.embed(crops)
    assert e.shape == (3, 512) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def test_weights_errors(tmp_path):
    with pytest.raises(ModelError, match="--pretrained /path"):
        export_clip("ViT-B-32", "laion2b_s34b_b79k", tmp_path / "a", offline=True)
    with pytest.raises(ModelError, match="not a pretrained tag"):
        export_clip("ViT-B-32", "no-such-tag", tmp_path / "b", offline=True)
    with pytest.raises(ModelError, match="checkpoint file not found"):
        export_clip("ViT-B-32", str(tmp_path / "missing.pt"), tmp_path / "c")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        export_clip("ViT-Q-99", None, tmp_path / "d")


def test_local_checkpoint_path(tmp_path):
    """A local checkpoint file works offline and its sha256 is recorded."""
    import torch

    from stm_agent.models.export import build_model

    model, _, _ = build_model("tiny-test-ckpt", None, model_cfg=TINY_TEST_CONFIG)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    rep = export_clip("tiny-test-ckpt", ckpt, tmp_path / "out")
    meta = rep.metadata["fp32"]
    assert meta.pretrained == "file:tiny.pt" and meta.checkpoint_sha256 == model_file_sha256(ckpt)


def test_cli_export(tmp_path, labelled_dir):
    from stm_agent.models.export import _register_config

    _register_config("tiny-test-cli", TINY_TEST_CONFIG)
    r = CliRunner().invoke(models_app, ["export", "--arch", "tiny-test-cli", "--pretrained", "none",
                                        "--out", str(tmp_path), "--check-dir", str(labelled_dir / "crops" / "FHPB")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["check_source"] == "given" and out["n_check_crops"] == 46
    r = CliRunner().invoke(models_app, ["export", "--arch", "ViT-B-32", "--pretrained", "openai",
                                        "--out", str(tmp_path / "x"), "--offline"])
    assert r.exit_code == 2


def test_fused_export_exact_with_nontrivial_weights(tmp_path, real_crops, sxm_crops):
    """Random init leaves every bias at 0 and every LayerNorm at (1, 0), which would hide a fusion
    that drops or mixes them up (q/k/v bias split, skip + bias, LayerNorm parameters). Perturb every
    parameter, export from the checkpoint, and compare with the unmodified torch model."""
    import torch

    from stm_agent.models.export import build_model

    model, _, _ = build_model("tiny-test-perturbed", None, model_cfg=TINY_TEST_CONFIG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ckpt = tmp_path / "perturbed.pt"
    torch.save(model.state_dict(), ckpt)
    rep = export_clip("tiny-test-perturbed", ckpt, tmp_path / "out", check_crops=real_crops,
                      calibration_crops=sxm_crops)
    assert rep.fused["Attention"] == 2 and rep.fused["SkipLayerNormalization"] == 4
    assert rep.min_cosine_torch > 0.99999, rep.to_json()
    assert rep.max_abs_diff_torch < 1e-3, rep.to_json()
    assert rep.cosine_vs_fp32["int8"]["min"] > 0.98
