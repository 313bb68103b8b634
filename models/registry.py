"""Build the encoder named in the configuration."""

from __future__ import annotations

from stm_agent.agent.config import EncoderConfig, NormaliseConfig
from stm_agent.agent.errors import ConfigError
from stm_agent.models.base import Encoder


def make_encoder(cfg: EncoderConfig, normalise: NormaliseConfig) -> Encoder:
    """Return the encoder ``cfg.name`` (``pixel`` | ``clip`` | ``zernike``).

    Raises
    ------
    ConfigError
        Unknown or unavailable encoder (the message names ``encoder.name`` and the allowed values),
        or ``clip`` without ``encoder.model_dir``.
    ModelError
        The CLIP model folder is missing/invalid or its ONNX file fails the sha256 check.
    """
    if cfg.name == "pixel":
        from stm_agent.models.pixel import PixelEncoder

        return PixelEncoder(size_px=normalise.size_px)
    if cfg.name == "zernike":
        from stm_agent.models.zernike import ZernikeEncoder

        return ZernikeEncoder(size_px=normalise.size_px)
    if cfg.name == "clip":
        if cfg.model_dir is None:
            raise ConfigError("encoder.model_dir: required for encoder.name 'clip' (a folder written by "
                              "`stm-agent models export`)")
        from stm_agent.models.clip_onnx import ClipOnnxEncoder

        return ClipOnnxEncoder(cfg.model_dir, threads=cfg.threads, batch_size=cfg.batch_size,
                               precision=cfg.precision, expected_sha256=cfg.model_sha256)
    raise ConfigError(f"encoder.name: {cfg.name!r} is not a single encoder; allowed: pixel, clip, zernike "
                      "('auto' is resolved per frame with agent.selection over make_encoders)")


def make_encoders(cfg: EncoderConfig, normalise: NormaliseConfig) -> dict[str, Encoder]:
    """Encoders for ``cfg.name``: ``{name: encoder}``; for ``auto`` the UniMR candidates pixel and
    clip (clip only when ``cfg.model_dir`` is set; otherwise pixel and zernike).

    Raises
    ------
    ConfigError, ModelError
        As :func:`make_encoder`.
    """
    if cfg.name != "auto":
        return {cfg.name: make_encoder(cfg, normalise)}
    second = "clip" if cfg.model_dir is not None else "zernike"
    return {n: make_encoder(cfg.model_copy(update={"name": n}), normalise) for n in ("pixel", second)}
