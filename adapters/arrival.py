"""What every source hands to the agent: an :class:`Arrival` (a new frame, or why it could not be had).

Sources (the folder watcher, the controller's ZeroMQ feed, the Nanonis TCP interface) run in their
own threads and call ``submit(arrival)``; the agent records each arrival in the store's inbox (on
disk) before it returns, so work that arrives faster than it is processed waits on disk, not in
memory, and survives a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

__all__ = ["Arrival", "Source", "Submit", "now_utc"]

ArrivalKind = Literal["file", "sxm", "array"]


def now_utc() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Arrival:
    """A complete frame (or one that never completed) handed on to the agent.

    Attributes
    ----------
    path : Path | None
        The scan file (``kind == "file"``), or None for a payload received over a feed.
    frame_id : str
        sha256 (hex) of the scan bytes (file bytes, .sxm payload, or array payload): the identity
        of the frame. For an error, the sha256 of whatever bytes there were (or of the reason).
    size : int
        Bytes hashed.
    received_at : datetime
        UTC time the frame was found complete / received (start of the agent's latency).
    received_mono : float
        ``time.monotonic()`` at the same moment, for latency measurements.
    error : str | None
        None for a usable frame; else why it is handed on unread (``"incomplete after N s ..."``).
    catch_up : bool
        Found by the folder catch-up at start (it arrived while the agent was not running).
    source : str
        ``"folder"``, ``"controller"`` or ``"nanonis"``.
    kind : {"file", "sxm", "array"}
        ``file``: read ``path``; ``sxm``: ``payload`` holds the raw .sxm bytes; ``array``:
        ``payload`` holds raw array bytes described by ``meta`` (``scan.array`` header).
    payload : bytes | None
        The received bytes (kinds ``sxm`` and ``array``).
    data : bytes | None
        ``kind == "file"``: the file's bytes as the source read them (safely, once, to hash them),
        so that the worker need not read the file again; None when not kept. Never stored.
    meta : dict
        The feed's JSON header (kind ``array``: shape, dtype, channel, direction, pixel_size_nm,
        bias_V, setpoint_A ...; any kind: an optional ``name`` for logs and result files).
    """

    path: Path | None
    frame_id: str
    size: int
    received_at: datetime
    received_mono: float
    error: str | None = None
    catch_up: bool = False
    source: str = "folder"
    kind: ArrivalKind = "file"
    payload: bytes | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """A short human name: the file name, or the feed's ``name``, or ``<source>:<frame_id[:12]>``."""
        if self.path is not None:
            return Path(self.path).name
        return str(self.meta.get("name") or f"{self.source}:{self.frame_id[:12]}")


Submit = Callable[[Arrival], None]


class Source(Protocol):
    """A source of frames. ``start()`` starts its thread(s), which call ``submit(arrival)`` once per
    new frame; ``stop()`` stops them (idempotent, bounded wait); ``stats()`` returns counters for
    the heartbeat (JSON-able dict, e.g. received, malformed by reason, connected)."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...

    def stats(self) -> dict[str, Any]: ...
