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


class DuplicateReferenceError(ReferenceLibraryError):
    """The object picked is already a reference (same crop); names the reference."""


class DiscoveryError(StmAgentError):
    """A discovery run cannot proceed: no scan, too few objects to cluster, unknown embedding or
    clustering, torch missing for the autoencoder (names the input and the reason)."""


class ConfigError(StmAgentError):
    """The configuration is invalid (names the key and the allowed values)."""


class NoObjectError(StmAgentError):
    """No segmented object at or near the position a user picked (names the scan and the position)."""


class ModelError(StmAgentError):
    """An encoder model cannot be built, exported or loaded: missing weights, missing or inconsistent
    ``model.json``, ONNX file whose sha256 differs from the one recorded at export.

    Attributes
    ----------
    source : str
        The model folder / file (or the model name) concerned.
    reason : str
        Why, in words a user understands (with what to do about it where possible).
    """

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class StoreError(StmAgentError):
    """The results database cannot be opened or written (names the file and the reason)."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class PublishError(StmAgentError):
    """A ZeroMQ endpoint cannot be bound/connected, or a message cannot be encoded (names the
    endpoint and the reason)."""

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class RefusedPathError(StmAgentError):
    """A path the agent was asked to read or write is refused: outside the configured roots, a
    symlink leading out of them, not a regular file (FIFO, device, directory), or too large.

    Attributes
    ----------
    source : str
        The path as given (never the file's content).
    reason : str
        Why it is refused.
    """

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class ScanGeometryError(ScanFormatError):
    """A readable scan whose geometry makes recognition impossible or unbounded (e.g. a SCAN_RANGE so
    small that the reference window spans more pixels than allowed)."""


class MissingChannelError(ScanFormatError, KeyError):
    """The scan has no such channel/direction (a KeyError too, for callers that look it up by key)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return f"{self.source}: {self.reason}"


class ChannelError(MissingChannelError):
    """The channel to analyse is not in the scan: names the scan, the channel, why it was wanted
    (configured, the library's, the ``channel: auto`` candidates) and the channels the scan has.

    A :class:`MissingChannelError`, so a ``ScanFormatError`` and a ``KeyError`` too.
    """

    def __init__(self, source: str | Path, channel: str, have: list[str], why: str = ""):
        self.channel = channel
        self.have = list(have)
        why = f" ({why})" if why else ""
        super().__init__(source, f"no channel {channel!r}{why}; the scan has {', '.join(self.have) or 'no channel'}")
