"""``stm-agent models``: export encoders (mounted by agent/cli.py as the ``models`` sub-command).

    stm-agent models export --arch ViT-B-32 --pretrained openai|laion2b_s34b_b79k|PATH.pt|none --out DIR
                            [--fp16] [--no-int8] [--calibrate-sxm SCANS_DIR]

Needs the optional extra ``pip install stm-agent[export]`` (torch, open_clip_torch, onnx).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from stm_agent.agent.console import err_console, esc, fail, typer_app
from stm_agent.agent.errors import StmAgentError

models_app = typer_app(help="Encoder models: export open_clip to ONNX for the runtime.")

#: Modules ``models export`` needs (the ``export`` extra), with the distribution that provides them.
EXPORT_MODULES = {"torch": "torch", "open_clip": "open_clip_torch", "onnx": "onnx", "onnxscript": "onnxscript"}


def missing_export_modules() -> list[str]:
    """Distributions of the ``export`` extra that are not installed (empty when export can run)."""
    import importlib.util

    return [dist for mod, dist in EXPORT_MODULES.items() if importlib.util.find_spec(mod) is None]


@models_app.callback()
def _models() -> None:
    """Encoder models: export open_clip to ONNX for the runtime."""



def load_check_crops(folder: Path, limit: int = 64) -> list[np.ndarray]:
    """Grey crops (uint8 2-D arrays) from image files under ``folder`` (recursive, sorted, at most ``limit``).

    Raises
    ------
    typer.BadParameter
        No readable image in the folder.
    """
    import cv2

    from stm_agent.adapters.images import IMAGE_SUFFIXES

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    crops = [c for c in (cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files) if c is not None]
    if not crops:
        raise typer.BadParameter(f"{folder}: no readable image (png/jpg/tif) to check the export with")
    return crops


def calibration_crops(folder: Path, per_scan: int = 32, limit: int = 256) -> list[np.ndarray]:
    """Normalised object crops cut from the ``.sxm`` scans under ``folder``, for int8 calibration.

    Each scan goes through the agent's own detection (:func:`agent.pipeline.detect`, default
    configuration); up to ``per_scan`` whole objects per scan are cut with a window of 1.3 x the
    90th percentile of their extents (``Region.extent_nm``) and normalised as queries are
    (:func:`agent.normalise.normalise_crops`). Unreadable scans are skipped.

    Returns
    -------
    list of uint8 ``(S, S)`` crops (at most ``limit``).

    Raises
    ------
    typer.BadParameter
        No ``.sxm`` file, or no object in any of them.
    """
    from stm_agent.adapters.sxm import read_sxm
    from stm_agent.agent.config import AgentConfig
    from stm_agent.agent.normalise import normalise_crops
    from stm_agent.agent.pipeline import detect

    cfg = AgentConfig()
    files = sorted(Path(folder).glob("*.sxm"))
    if not files:
        raise typer.BadParameter(f"{folder}: no .sxm scan to calibrate the int8 model with")
    out: list[np.ndarray] = []
    for f in files:
        try:
            scan = read_sxm(f)
            image, regions = detect(scan, cfg)
        except (StmAgentError, ValueError) as e:
            err_console.print(f"calibration: skipped {esc(f.name)} ({esc(e)})", soft_wrap=True)
            continue
        inner = [r for r in regions if not r.touches_edge][:per_scan]
        if not inner:
            continue
        diam = np.array([r.extent_nm for r in inner], float)
        centres = np.array([r.centroid_px for r in inner], np.float64)
        out.extend(normalise_crops(image, centres, 1.3 * float(np.percentile(diam, 90)), scan.pixel_size_nm,
                                   cfg.normalise))
        if len(out) >= limit:
            break
    if not out:
        raise typer.BadParameter(f"{folder}: no object found in the .sxm scans to calibrate with")
    return out[:limit]


@models_app.command("export")
def export_cmd(
    arch: str = typer.Option("ViT-B-32", "--arch", help="open_clip architecture."),
    pretrained: str = typer.Option(..., "--pretrained",
                                   help="Weights: an open_clip tag (openai, laion2b_s34b_b79k), a checkpoint "
                                        "file PATH, or 'none' (random weights: tests/benchmarks only)."),
    out: Path = typer.Option(..., "--out", help="Output model folder (model.onnx + model.json)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write OUT/fp16 (fp16 weights)."),
    int8: bool = typer.Option(True, "--int8/--no-int8",
                              help="Also write OUT/int8-dynamic (and OUT/int8 with --calibrate-sxm)."),
    calibrate_sxm: Optional[Path] = typer.Option(None, "--calibrate-sxm",
                                                 help="Folder of .sxm scans: write OUT/int8 (the CPU default), its "
                                                      "activation scales calibrated on object crops cut from them."),
    exporter: str = typer.Option("torchscript", "--exporter",
                                 help="torchscript (fusable, default) or dynamo (opset 18, not fused)."),
    check_dir: Optional[Path] = typer.Option(None, "--check-dir",
                                             help="Folder of real STM crops (images) to check ONNX against torch; "
                                                  "default: 8 synthetic crops."),
    offline: bool = typer.Option(False, "--offline", help="Never try to download weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model in OUT."),
) -> None:
    """Export the image tower of an open_clip model to ONNX, check it, write model.json."""
    missing = missing_export_modules()
    if missing:
        fail(f'models export needs the export extra: pip install "stm-agent[export]" (missing: {", ".join(missing)})')
    from stm_agent.models.export import export_clip

    crops = load_check_crops(check_dir) if check_dir else None
    calib = calibration_crops(calibrate_sxm) if calibrate_sxm else None
    try:
        rep = export_clip(arch, None if pretrained.lower() == "none" else pretrained, out, fp16=fp16, int8=int8,
                          check_crops=crops, offline=offline, overwrite=overwrite, calibration_crops=calib,
                          exporter=exporter)
    except StmAgentError as e:
        fail(e)
    typer.echo(json.dumps(rep.to_json(), indent=2))
