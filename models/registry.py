"""Build the encoder named in the configuration."""

from __future__ import annotations

from agent.config import EncoderConfig, NormaliseConfig
from agent.errors import ConfigError
from models.base import Encoder


def make_encoder(cfg: EncoderConfig, normalise: NormaliseConfig) -> Encoder:
    """Return the encoder ``cfg.name`` (``pixel`` | ``clip`` | ``zernike``).

    Raises
    ------
    ConfigError
        Unknown or unavailable encoder (the message names ``encoder.name`` and the allowed values).
    """
    if cfg.name == "pixel":
        from models.pixel import PixelEncoder

        return PixelEncoder(size_px=normalise.size_px)
    raise ConfigError(f"encoder.name: {cfg.name!r} is not available yet; allowed: pixel")
