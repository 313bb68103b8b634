"""Typed errors of stm-agent. Every error names the file (or input) and the reason."""

from __future__ import annotations

from pathlib import Path


class StmAgentError(Exception):
    """Base class of every error stm-agent raises on purpose."""


class ScanFormatError(StmAgentError):
    """A scan file cannot be read: wrong format, truncated, inconsistent header.

    Attributes
    ----------
    source : str
        The file path (or another name of the input, e.g. ``zmq:scan.sxm``).
    reason : str
        Why it cannot be read, in words a user understands.
    """

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class EmptyScanError(ScanFormatError):
    """A well-formed scan that holds no acquired line (aborted before the first line)."""

    def __init__(self, source: str | Path, reason: str = "no acquired lines"):
        super().__init__(source, reason)


class ImageFormatError(ScanFormatError):
    """A PNG/JPG/TIFF image cannot be read as a scan."""


class ReferenceLibraryError(StmAgentError):
    """The reference library is missing, empty or inconsistent (names the folder and the reason)."""


class ConfigError(StmAgentError):
    """The configuration is invalid (names the key and the allowed values)."""
