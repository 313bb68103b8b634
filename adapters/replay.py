"""A simulated STM controller: replays the scans of a folder on the controller feed.

:class:`ReplayFeed` BINDS an XPUB socket (a PUB that also sees subscriptions), optionally waits
until a subscriber (the agent's :class:`adapters.controller.ControllerSource`) has subscribed, and
publishes the folder's ``*.sxm`` files (sorted by name, cycled) one every ``interval_s`` seconds as

* ``scan.sxm``: the raw file bytes;
* ``scan.array``: one frame (``channel``/``direction``) read with :func:`adapters.sxm.read_sxm`, in
  display orientation, NaN rows kept, header from the Scan (:func:`adapters.arrayscan.array_meta_from_scan`);
  files that cannot be read, or lack the channel, are skipped with a warning;
* ``scan.saved``: the file's absolute path.

``unique=True`` makes every published frame distinct content, so a load test of 1,000 frames from
30 files is not de-duplicated by sha256:

* sxm: the line ``stm-agent replay <index>`` is inserted as the first line of the header's
  ``:COMMENT:`` value (a ``:COMMENT:`` section is added before ``:SCANIT_END:`` when missing). The
  reader finds the data after ``:SCANIT_END:`` + ``\\x1a\\x04`` and computes the expected size from
  the header, so the file still reads, with the same data;
* array: the first finite pixel's float32 bit pattern is XOR-ed with ``index + 1`` (only low
  mantissa bits change: a relative change below ``(index + 1) * 2**-23``, ~1e-4 for index 1000);
* saved: not supported (the file is the content); :class:`ConfigError`.

Back-pressure instead of drops: ``ZMQ_XPUB_NODROP`` is set, so when a subscriber's queue holds
``sndhwm`` messages the send waits (up to ``send_timeout_s``) instead of silently dropping; a run of
1,000 frames loses nothing and memory stays bounded by ``sndhwm`` x frame size. ``LINGER`` is
bounded (``linger_ms``) so closing never hangs.

Acknowledged mode (``ack=True``, the agent's ``controller.ack: true``): the feed BINDS a ROUTER
socket instead, waits for the agent's ``[ready]`` and sends ``[frame, msg_id, topic, header,
payload]`` to it, at most ``window`` frames not yet acknowledged at a time. A frame is kept until
the agent answers ``[ack, msg_id, status]`` (sent once the frame is on the agent's disk); it is sent
again after ``ack_timeout_s`` without an answer, and at once to an agent that announces itself anew
(a restarted agent: new ``ready`` from a new peer). :meth:`ReplayFeed.run` returns once every frame
is acknowledged (or ``send_timeout_s`` passed without progress). So nothing is lost even when the
agent is killed (-9) mid-stream; a frame already stored is acknowledged as ``duplicate``.

CURVE (``curve_secret_file``): the feed serves as a CURVE server with the key pair of a
``zmq.auth`` certificate (``zmq.auth.create_certificates(folder, "controller")`` writes
``controller.key`` and ``controller.key_secret``); the agent pins the public key
(``controller.curve_server_key``).

The encoders (:func:`encode_sxm_message`, :func:`encode_array_message`, :func:`encode_saved_message`)
live in :mod:`adapters.arrayscan` with the validation and are re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import zmq

from stm_agent.adapters.arrayscan import (
    array_meta_from_scan,
    encode_array_message,
    encode_saved_message,
    encode_sxm_message,
)
from stm_agent.adapters.files import sha256_file
from stm_agent.adapters.sxm import END_TAG, read_sxm
from stm_agent.agent.errors import ConfigError, PublishError, ScanFormatError

__all__ = ["ReplayFeed", "SentFrame", "make_unique_sxm", "make_unique_array",
           "encode_sxm_message", "encode_array_message", "encode_saved_message"]

log = logging.getLogger(__name__)

Mode = Literal["sxm", "array", "saved"]
MODES = ("sxm", "array", "saved")


@dataclass(frozen=True)
class SentFrame:
    """One published frame: ``index`` (0, 1, ...), file ``name``, ``frame_id`` (sha256 of the
    payload, or of the file for ``scan.saved``), ``topic``, ``size`` (payload bytes) and
    ``sent_mono`` (``time.monotonic()`` just after the send, for latency)."""

    index: int
    name: str
    frame_id: str
    topic: str
    size: int
    sent_mono: float


def make_unique_sxm(data: bytes, index: int) -> bytes:
    """Return .sxm bytes whose header COMMENT starts with ``stm-agent replay <index>``.

    Raises
    ------
    ScanFormatError
        No ``:SCANIT_END:`` in ``data`` (not an .sxm header).
    """
    end = data.find(END_TAG)
    if end < 0:
        raise ScanFormatError("<bytes>", "cannot make it unique: no ':SCANIT_END:' in the data")
    tag = f"stm-agent replay {index}\n".encode("ascii")
    key = data.find(b":COMMENT:", 0, end)
    if key >= 0:
        nl = data.find(b"\n", key, end)
        if nl >= 0:
            return data[: nl + 1] + tag + data[nl + 1:]
    return data[:end] + b":COMMENT:\n" + tag + data[end:]


def make_unique_array(arr: np.ndarray, index: int) -> np.ndarray:
    """A float32 copy of ``arr`` with the first finite pixel's low mantissa bits XOR-ed with ``index + 1``.

    Parameters
    ----------
    arr : np.ndarray
        ``(ny, nx)`` float array.
    index : int
        0 <= index < 2**22.

    Returns
    -------
    np.ndarray
        float32 ``(ny, nx)``; differs from ``arr`` in one pixel by a relative ``<= (index + 1) * 2**-23``.
    """
    out = np.array(arr, dtype=np.float32, copy=True)
    flat = out.reshape(-1)
    finite = np.flatnonzero(np.isfinite(flat))
    k = int(finite[0]) if finite.size else 0
    bits = flat[k: k + 1].view(np.uint32)
    bits ^= np.uint32((index + 1) & 0x3FFFFF)
    return out


class ReplayFeed:
    """Binds an XPUB socket and publishes the scans of ``folder`` as the controller would.

    Parameters
    ----------
    folder : Path
        Folder of ``*.sxm`` files (sorted by name; not recursive).
    endpoint : str
        Where to bind (``tcp://127.0.0.1:*`` = a free port; read :attr:`endpoint`).
    mode : {"sxm", "array", "saved"}
        Topic ``scan.<mode>``.
    interval_s : float
        Seconds between frames (>= 0; scheduled on a fixed grid, no drift).
    count : int
        Frames in total, cycling through the files; 0 = each file once.
    unique : bool
        Make every frame distinct content (see the module doc).
    channel, direction : str
        Frame sent in ``array`` mode.
    sndhwm : int
        ZMQ_SNDHWM: frames queued per subscriber before the send waits (XPUB_NODROP).
    linger_ms : int
        ZMQ_LINGER on close, ms.
    send_timeout_s : float
        Longest a send waits for a full queue before the frame is given up (logged); in ack
        mode, longest :meth:`run` waits without any acknowledgement before it gives up.
    ack : bool
        Acknowledged mode (ROUTER; see the module doc).
    window : int
        Ack mode: frames sent and not yet acknowledged, at most.
    ack_timeout_s : float
        Ack mode: a frame not acknowledged this long after it was sent is sent again.
    curve_secret_file : str | Path | None
        A ``zmq.auth`` secret certificate: serve as a CURVE server with its key pair.
    context : zmq.Context, optional

    Attributes
    ----------
    acked : dict
        Ack mode: msg_id (frame index as text) -> status the agent answered (``stored``,
        ``duplicate``, ``rejected``).
    resent : int
        Ack mode: frames sent again (timeout, or a restarted agent).

    Raises
    ------
    ConfigError
        Bad mode / count / interval, the folder has no .sxm file, ``unique`` with mode ``saved``,
        a certificate that cannot be read.
    PublishError
        The endpoint cannot be bound.
    """

    def __init__(self, folder: str | Path, endpoint: str = "tcp://127.0.0.1:5560", *, mode: Mode = "sxm",
                 interval_s: float = 1.0, count: int = 0, unique: bool = False, channel: str = "Z",
                 direction: str = "forward", sndhwm: int = 1000, linger_ms: int = 5000,
                 send_timeout_s: float = 60.0, ack: bool = False, window: int = 16, ack_timeout_s: float = 5.0,
                 curve_secret_file: str | Path | None = None, context: zmq.Context | None = None):
        self.folder = Path(folder)
        if mode not in MODES:
            raise ConfigError(f"replay: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if count < 0 or interval_s < 0:
            raise ConfigError(f"replay: count and interval must be >= 0 (got count={count}, interval={interval_s})")
        if unique and mode == "saved":
            raise ConfigError("replay: unique is not available in mode 'saved' (the file itself is the content)")
        if direction not in ("forward", "backward"):
            raise ConfigError(f"replay: direction must be forward or backward, got {direction!r}")
        if not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: not a folder")
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() == ".sxm")
        if not self.files:
            raise ConfigError(f"{self.folder}: no .sxm file to replay")
        self.mode, self.interval_s, self.unique = mode, float(interval_s), bool(unique)
        self.once = count == 0  # each file once (skipped files are not replaced by repeats)
        self.count = int(count) or len(self.files)
        self.channel, self.direction = channel, direction
        self.send_timeout_s = float(send_timeout_s)
        self.skipped: dict[str, str] = {}  # file name -> why it was not sent (array mode)
        self._cache: dict[Path, tuple[np.ndarray, dict] | None] = {}
        self.ack, self.window, self.ack_timeout_s = bool(ack), max(int(window), 1), float(ack_timeout_s)
        self.acked: dict[str, str] = {}
        self.resent = 0
        self._peer: bytes | None = None
        self._unacked: OrderedDict[bytes, list] = OrderedDict()  # msg_id -> [frames, last sent (0: due), times sent]
        keys = None
        if curve_secret_file is not None:
            from zmq import auth as zmq_auth

            try:
                keys = zmq_auth.load_certificate(str(curve_secret_file))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{curve_secret_file}: cannot read the CURVE certificate ({exc})") from exc
            if keys[1] is None:
                raise ConfigError(f"{curve_secret_file}: not a secret certificate (use the .key_secret file)")
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER if self.ack else zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        self._sock.setsockopt(zmq.LINGER, int(linger_ms))
        if self.ack:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished agent fails, not vanishes
        else:
            self._sock.setsockopt(zmq.XPUB_NODROP, 1)
        if keys is not None:
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = keys
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise PublishError(endpoint, f"cannot bind the replay {'ROUTER' if self.ack else 'XPUB'} socket "
                                         f"({exc})") from exc
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.subscribers = 0  # subscription messages seen (ack mode: agents that said ready)

    def wait_for_subscriber(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until a subscriber has subscribed to this feed's topic
        (``scan.<mode>``, or a prefix of it). True if one did; frames sent before are lost."""
        topic = f"scan.{self.mode}".encode()
        deadline = time.monotonic() + max(timeout_s, 0.0)
        if self.ack:  # the agent's DEALER says ready
            while self._peer is None:
                left = int(max(deadline - time.monotonic(), 0) * 1000)
                if not self._pump(left) and time.monotonic() >= deadline:
                    return False
            self.subscribers += 1
            return True
        while True:
            left = int(max(deadline - time.monotonic(), 0) * 1000)
            if not self._sock.poll(left, zmq.POLLIN):
                return False
            msg = self._sock.recv()
            if msg[:1] == b"\x01" and topic.startswith(msg[1:]):
                self.subscribers += 1
                return True

    def _frames(self, index: int, path: Path) -> tuple[list[bytes], str] | None:
        """(multipart message, frame_id) for frame ``index`` from ``path``; None = skip the file."""
        if self.mode == "saved":
            fid, _ = sha256_file(path)
            return encode_saved_message(path.resolve()), fid
        if self.mode == "sxm":
            data = path.read_bytes()
            if self.unique:
                data = make_unique_sxm(data, index)
            return encode_sxm_message(data, path.name), hashlib.sha256(data).hexdigest()
        if path not in self._cache:
            try:
                scan = read_sxm(path)
                arr = scan.frame(self.channel, self.direction)  # display orientation, NaN rows kept
                self._cache[path] = (arr, array_meta_from_scan(scan, self.channel, self.direction))
            except (ScanFormatError, KeyError) as exc:
                why = exc.args[0] if isinstance(exc, KeyError) else str(exc)
                log.warning("replay: %s skipped: %s", path.name, why)
                self.skipped[path.name] = str(why)
                self._cache[path] = None
        got = self._cache[path]
        if got is None:
            return None
        arr, meta = got
        if self.unique:
            arr = make_unique_array(arr, index)
        frames = encode_array_message(arr, meta)
        return frames, hashlib.sha256(frames[-1]).hexdigest()

    # ------------------------------------------------------------------ ack mode
    def _pump(self, timeout_ms: int) -> bool:
        """Ack mode: take the agent's messages (ready, ack) for up to ``timeout_ms``, send again what
        timed out. True if a message came."""
        got = False
        if self._sock.poll(max(int(timeout_ms), 0), zmq.POLLIN):
            while True:
                try:
                    msg = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = True
                peer, kind, rest = msg[0], msg[1] if len(msg) > 1 else b"", msg[2:]
                if kind == b"ready" and peer != self._peer:
                    self._peer = peer  # a new (or restarted) agent: everything not acknowledged goes again
                    for item in self._unacked.values():
                        item[1] = 0.0
                elif kind == b"ack" and rest:
                    if self._unacked.pop(rest[0], None) is not None:
                        self.acked[rest[0].decode("ascii", "replace")] = (
                            rest[1].decode("ascii", "replace") if len(rest) > 1 else "")
        now = time.monotonic()
        for msg_id, item in self._unacked.items():
            if self._peer is None:
                break
            if item[1] == 0.0 or now - item[1] >= self.ack_timeout_s:
                if not self._send_to_peer(msg_id, item):
                    break
        return got

    def _send_to_peer(self, msg_id: bytes, item: list) -> bool:
        try:
            self._sock.send_multipart([self._peer, b"frame", msg_id, *item[0]], flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full: later
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._peer = None  # gone (killed?): wait for the next ready, then send everything again
            for it in self._unacked.values():
                it[1] = 0.0
            return False
        item[1] = time.monotonic()
        if item[2]:
            self.resent += 1
        item[2] += 1
        return True

    def _send_acked(self, index: int, frames: list[bytes], stop: threading.Event | None) -> bool:
        """Queue one frame for the agent (waits while ``window`` frames are unacknowledged)."""
        deadline = time.monotonic() + self.send_timeout_s
        n_acked = len(self.acked)
        while len(self._unacked) >= self.window:
            if stop is not None and stop.is_set():
                return False
            self._pump(20)
            if len(self.acked) != n_acked:
                n_acked, deadline = len(self.acked), time.monotonic() + self.send_timeout_s
            if time.monotonic() > deadline:
                return False
        msg_id = str(index).encode("ascii")
        item = [frames, 0.0, 0]
        self._unacked[msg_id] = item
        if self._peer is not None:
            self._send_to_peer(msg_id, item)
        self._pump(0)
        return True

    def wait_acked(self, timeout_s: float | None = None, stop: threading.Event | None = None) -> bool:
        """Ack mode: wait until every frame sent is acknowledged (sending again what times out).

        Waits at most ``timeout_s`` (default ``send_timeout_s``) without any acknowledgement coming
        in. True if all are acknowledged."""
        limit = self.send_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + limit
        n = len(self.acked)
        while self._unacked:
            if stop is not None and stop.is_set():
                return False
            self._pump(50)
            if len(self.acked) != n:
                n, deadline = len(self.acked), time.monotonic() + limit
            if time.monotonic() > deadline:
                return False
        return True

    @property
    def unacked(self) -> int:
        """Ack mode: frames sent and not acknowledged yet."""
        return len(self._unacked)

    def _send(self, frames: list[bytes], stop: threading.Event | None) -> bool:
        """Send, waiting while the subscriber's queue is full (XPUB_NODROP). False if given up."""
        deadline = time.monotonic() + self.send_timeout_s
        while True:
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    return False
                time.sleep(0.002)

    def run(self, on_sent: Callable[[SentFrame], None] | None = None,
            stop: threading.Event | None = None) -> list[SentFrame]:
        """Publish ``count`` frames, one every ``interval_s``; returns what was sent.

        Parameters
        ----------
        on_sent : callable(SentFrame), optional
            Called after each send (e.g. to print it).
        stop : threading.Event, optional
            Set it to stop early.

        Returns
        -------
        list of SentFrame
            In order; frames given up (queue full for ``send_timeout_s``) and skipped files are absent.

        Raises
        ------
        ConfigError
            Array mode and no file of the folder could be read.
        """
        sent: list[SentFrame] = []
        t0 = time.monotonic()
        index, attempts = 0, 0
        n_files = len(self.files)
        while index < self.count and not (stop is not None and stop.is_set()):
            if self.once and attempts >= n_files:
                break
            if len(self.skipped) >= n_files:
                raise ConfigError(f"{self.folder}: no file could be sent as {self.channel} {self.direction} "
                                  f"array ({len(self.skipped)} skipped)")
            path = self.files[attempts % n_files]
            attempts += 1
            got = self._frames(index, path)
            if got is None:
                continue
            frames, fid = got
            due = t0 + index * self.interval_s
            wait = due - time.monotonic()
            if wait > 0:
                if stop is not None:
                    if stop.wait(wait):
                        break
                else:
                    time.sleep(wait)
            if not (self._send_acked(index, frames, stop) if self.ack else self._send(frames, stop)):
                log.warning("replay: frame %d (%s) given up: the subscriber's queue stayed full", index, path.name)
                index += 1
                continue
            item = SentFrame(index=index, name=path.name, frame_id=fid, topic=frames[0].decode(),
                             size=len(frames[-1]) if len(frames) == 3 else 0, sent_mono=time.monotonic())
            sent.append(item)
            index += 1
            if on_sent is not None:
                on_sent(item)
        if self.ack and not self.wait_acked(stop=stop):
            log.warning("replay: %d frame(s) not acknowledged by the agent", len(self._unacked))
        return sent

    def close(self) -> None:
        """Close the socket (queued frames are kept up to ``linger_ms``). Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None  # type: ignore[assignment]

    def __enter__(self) -> "ReplayFeed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
