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
from stm_agent.models.metadata import sha256_file


@pytest.fixture(scope="module")
def real_crops(labelled_dir) -> list[np.ndarray]:
    files = sorted(p for p in (labelled_dir / "crops").rglob("*") if p.suffix.lower() in (".jpg", ".png"))[::8]
    assert len(files) >= 10
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files]


def test_tiny_export_all_precisions(tmp_path, real_crops):
    rep = export_clip("tiny-test-export", None, tmp_path, fp16=True, int8=True, check_crops=real_crops,
                      model_cfg=TINY_TEST_CONFIG)
    assert rep.check_source == "given" and rep.n_check_crops == len(real_crops)
    assert rep.max_abs_diff_torch < 1e-4 and rep.min_cosine_torch > 0.9999
    assert rep.cosine_vs_fp32["fp16"]["min"] > 0.999
    assert rep.cosine_vs_fp32["int8"]["min"] > 0.95
    assert rep.file_bytes["fp16"] < rep.file_bytes["fp32"] and rep.file_bytes["int8"] < rep.file_bytes["fp32"]
    m = onnx.load(str(tmp_path / "model.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # dynamic batch axis
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["onnx_sha256"] == sha256_file(tmp_path / "model.onnx")
    assert meta["image_size"] == 64 and meta["embed_dim"] == 32 and meta["pretrained"] == "none"
    assert meta["interpolation"] == "bicubic" and meta["torch_version"] and meta["open_clip_version"]
    for prec in ("fp16", "int8"):
        enc = ClipOnnxEncoder(tmp_path / prec)
        assert enc.meta.precision == prec and enc.id.endswith(f"/{prec}")
    with pytest.raises(ModelError, match="already holds"):
        export_clip("tiny-test-export", None, tmp_path, model_cfg=TINY_TEST_CONFIG)


def test_vit_b32_random_weights(tmp_path, real_crops):
    """The real architecture (ViT-B/32, 512-d) exports and matches torch on real crops."""
    rep = export_clip("ViT-B-32", "none", tmp_path, check_crops=real_crops[:3])
    assert rep.max_abs_diff_torch < 1e-3 and rep.min_cosine_torch > 0.9999
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
    assert meta.pretrained == "file:tiny.pt" and meta.checkpoint_sha256 == sha256_file(ckpt)


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
