"""Nanonis TCP source: ``Scan.WaitEndOfScan`` through the Nanonis TCP programming interface.

A thread connects to Nanonis (``cfg.host:cfg.port``, default 6501; enable the interface in Nanonis
under File > Settings > TCP Programming Interface) and calls ``Scan.WaitEndOfScan`` again and again
(timeout ``cfg.wait_timeout_s``). For every end of scan with an auto-saved file it waits until the
file is complete on disk (size == :func:`adapters.sxm.expected_file_size`, bounded), hashes it and
submits ``Arrival(kind="file", source="nanonis")``. When Nanonis is unreachable or the connection
drops it reconnects every ``cfg.reconnect_s``, logging once per state change.

Protocol (Nanonis "TCP Protocol" document). Every request and reply starts with a 40-byte header:
command name (32 bytes ASCII, NUL padded), body size (int32 BE), send-response flag (uint16 BE),
2 zero bytes. ``Scan.WaitEndOfScan`` request body: timeout ms (int32 BE, -1 = forever). Reply body:
timeout status (uint32 BE, 1 = timed out), file path size (int32 BE), file path, then the error
section: error status (uint32 BE), error description size (int32 BE), error description.

Why not the ``nanonis-spm`` or ``nanonisTCP`` packages: a reply can span many TCP segments and both
packages read it with bare ``recv`` calls that assume otherwise. ``nanonis_spm`` 1.0.9
(``NanonisClass.send``) does ``recv(40)`` for the header (a short read gives a wrong body size),
sends with ``send`` not ``sendall``, spins 1000 extra ``recv`` calls per reply, sets a 1000 s socket
timeout, strips ASCII ``'0'`` from the reply's command name and prints errors instead of raising.
``nanonisTCP`` 1.1.5 (``receive_response``) reads ``recv(200)`` and parses the body size from it
whether or not 36 bytes arrived, and loops forever (busy) when the peer closes (``recv`` returns
``b""``); its ``check_error`` with the default ``version`` reads an extra 4-byte "error code" that
the documented layout above does not have. Neither can be interrupted to stop the agent quickly. So
this module has its own ~60-line client (:class:`NanonisClient`) that reads exactly the header and
then exactly the body, with a bounded, interruptible wait.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stm_agent.adapters.arrival import Arrival, now_utc
from stm_agent.adapters.files import Roots, read_regular
from stm_agent.adapters.sxm import MAX_FILE_BYTES, expected_file_size
from stm_agent.agent.config import NanonisConfig
from stm_agent.agent.errors import RefusedPathError, ScanFormatError, StmAgentError

__all__ = ["NanonisSource", "NanonisClient", "NanonisError", "WaitResult", "HEADER_SIZE",
           "pack_header", "parse_wait_reply"]

log = logging.getLogger(__name__)

HEADER_SIZE = 40
_HEADER = struct.Struct(">32siHH")
MAX_BODY = 1 << 20  # a WaitEndOfScan reply holds a path and an error text; more means a lost stream
_SLICE_S = 0.2  # socket timeout slice: how quickly a blocked read notices stop()
_LOG_CHARS = 300  # longest Nanonis text (error description, path) put into a log line
_BACKOFF_START_S = 0.05  # first pause after a reply that came back early (timed out at once, or an error)


def _short(text: str, n: int = _LOG_CHARS) -> str:
    """``text`` cut to ``n`` characters for logs, saying how long it was."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


class NanonisError(StmAgentError):
    """The Nanonis TCP connection failed or a reply broke the protocol (names host:port and why)."""

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


@dataclass(frozen=True)
class WaitResult:
    """A ``Scan.WaitEndOfScan`` reply: ``timed_out``, ``path`` ("" when nothing was saved),
    ``error_status`` (0 = no error) and ``error`` (Nanonis' description)."""

    timed_out: bool
    path: str
    error_status: int
    error: str


def pack_header(command: str, body_size: int, send_response: bool = True) -> bytes:
    """The 40-byte header: name (32 bytes NUL padded), body size int32 BE, flag uint16 BE, 2 zero bytes.

    Raises
    ------
    ValueError
        The command name is not ASCII or longer than 32 bytes.
    """
    name = command.encode("ascii")
    if len(name) > 32:
        raise ValueError(f"command name {command!r} is longer than 32 bytes")
    return _HEADER.pack(name.ljust(32, b"\0"), int(body_size), 1 if send_response else 0, 0)


def _text(raw: bytes) -> str:
    """Strings from Nanonis (Windows): UTF-8 if valid, else cp1252, else Latin-1."""
    for enc in ("utf-8", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def parse_wait_reply(body: bytes, source: str = "nanonis") -> WaitResult:
    """Parse a ``Scan.WaitEndOfScan`` reply body.

    Raises
    ------
    NanonisError
        The body is shorter than its own size fields say, or a size is negative.
    """
    def need(pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > len(body):
            raise NanonisError(source, f"Scan.WaitEndOfScan reply of {len(body)} bytes is too short for {what}")

    need(0, 8, "timeout status and path size")
    timed_out, n_path = struct.unpack_from(">Ii", body, 0)
    need(8, n_path, f"a path of {n_path} bytes")
    path = _text(body[8:8 + n_path])
    pos = 8 + n_path
    status, error = 0, ""
    if len(body) > pos:  # the error section
        need(pos, 8, "the error section")
        status, n_err = struct.unpack_from(">Ii", body, pos)
        need(pos + 8, n_err, f"an error description of {n_err} bytes")
        error = _text(body[pos + 8:pos + 8 + n_err]).strip("\0").strip()
    return WaitResult(timed_out=bool(timed_out), path=path.strip("\0"), error_status=int(status), error=error)


class NanonisClient:
    """A minimal Nanonis TCP client that reads every reply fully.

    Parameters
    ----------
    host, port : str, int
        The Nanonis TCP programming interface (default port 6501).
    stop : threading.Event, optional
        When set, a blocked read gives up within ~0.2 s (:class:`NanonisError`).
    connect_timeout_s : float
    """

    def __init__(self, host: str, port: int, stop: threading.Event | None = None, connect_timeout_s: float = 2.0):
        self.address = f"{host}:{port}"
        self._stop = stop or threading.Event()
        self._sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        """Exactly ``n`` bytes, however the stream is segmented; NanonisError on close/timeout/stop."""
        buf = bytearray()
        while len(buf) < n:
            if self._stop.is_set():
                raise NanonisError(self.address, "stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise NanonisError(self.address, f"no complete reply in time ({len(buf)} of {n} bytes)")
            self._sock.settimeout(min(_SLICE_S, left))
            try:
                chunk = self._sock.recv(min(n - len(buf), 1 << 16))
            except socket.timeout:
                continue
            if not chunk:
                raise NanonisError(self.address, "connection closed by Nanonis")
            buf += chunk
        return bytes(buf)

    def request(self, command: str, body: bytes, reply_timeout_s: float) -> bytes:
        """Send ``command`` with ``body`` and return the reply body (read fully).

        Raises
        ------
        NanonisError
            Connection closed/failed, no reply within ``reply_timeout_s``, a reply for another
            command, or an absurd body size.
        OSError
            Sending failed.
        """
        self._sock.settimeout(max(reply_timeout_s, 1.0))
        self._sock.sendall(pack_header(command, len(body)) + body)
        deadline = time.monotonic() + reply_timeout_s
        name, size, _, _ = _HEADER.unpack(self._recv_exact(HEADER_SIZE, deadline))
        got = name.rstrip(b"\0").decode("ascii", "replace")
        if got != command:
            raise NanonisError(self.address, f"reply is for {got!r}, not {command!r} (stream out of step)")
        if not 0 <= size <= MAX_BODY:
            raise NanonisError(self.address, f"reply body size {size} is outside 0..{MAX_BODY}")
        return self._recv_exact(size, deadline)

    def wait_end_of_scan(self, timeout_ms: int) -> WaitResult:
        """``Scan.WaitEndOfScan`` with ``timeout_ms`` (-1 = forever; a reply is awaited 10 s longer)."""
        wait_s = 1e9 if timeout_ms < 0 else timeout_ms / 1000.0 + 10.0
        body = self.request("Scan.WaitEndOfScan", struct.pack(">i", int(timeout_ms)), wait_s)
        return parse_wait_reply(body, self.address)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self._sock.close()
        except OSError:
            pass


class NanonisSource:
    """Submits the file of every end of scan Nanonis reports over its TCP interface.

    Parameters
    ----------
    cfg : NanonisConfig
        ``host``, ``port``, ``wait_timeout_s`` (WaitEndOfScan timeout, s), ``reconnect_s``.
    submit : callable(Arrival)
        Called from this source's thread; may raise (logged, counted in ``submit_errors``).
    known : callable(frame_id) -> bool
        True for frames already processed (skipped, ``duplicates``).
    complete_wait_s : float
        Longest wait for a reported file to reach the size its header announces; after that an
        error Arrival (``"incomplete after N s ..."``) is submitted.
    roots : Roots, optional
        Folders reported paths must resolve into (the agent passes the acquisition roots); a path
        elsewhere, a FIFO or a device is refused at once (error Arrival, ``refused``). None = any
        path (regular files only, bounded).

    Notes
    -----
    ``stats()``: ``address``, ``alive``, ``connected``, ``scans`` (files submitted), ``errors``
    (error replies, protocol errors, files that never completed), ``reconnects`` (connections
    made after a lost or failed one), ``timeouts``, ``duplicates``, ``submit_errors``, ``refused``
    (paths outside the roots, not regular files), ``backoffs`` (pauses after replies that came
    back long before the requested timeout: a Nanonis that answers "timed out" at once would
    otherwise be asked thousands of times a second).
    The path Nanonis reports must be readable on this computer (run the agent on the Nanonis PC or
    map the same path).
    """

    name = "nanonis"

    def __init__(self, cfg: NanonisConfig, submit: Callable[[Arrival], None],
                 known: Callable[[str], bool] = lambda fid: False, complete_wait_s: float = 10.0,
                 roots: Roots | None = None):
        self.cfg = cfg
        self.roots = roots
        self.address = f"{cfg.host}:{cfg.port}"
        self._submit = submit
        self._known = known
        self.complete_wait_s = float(complete_wait_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connected = False
        self._state = "init"  # init | connected | down: logged on change only
        self._counts = {"scans": 0, "errors": 0, "reconnects": 0, "timeouts": 0, "duplicates": 0, "submit_errors": 0,
                        "refused": 0, "backoffs": 0}

    def start(self) -> None:
        """Start the thread (no-op when running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stm-agent-nanonis", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (idempotent; a blocked read notices within ~0.2 s)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)
            if t.is_alive():
                log.warning("nanonis: thread did not stop within %.1f s", timeout_s)

    def stats(self) -> dict[str, Any]:
        """Counters for the heartbeat (see the class notes)."""
        with self._lock:
            return {"address": self.address, "alive": bool(self._thread and self._thread.is_alive()),
                    "connected": self._connected, **self._counts}

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _set_state(self, state: str, why: str = "") -> None:
        if state == self._state:
            return
        was, self._state = self._state, state
        with self._lock:
            self._connected = state == "connected"
            if state == "connected" and was == "down":
                self._counts["reconnects"] += 1
        if state == "connected":
            log.info("nanonis: connected to %s", self.address)
        elif was == "connected":
            log.warning("nanonis: connection to %s lost (%s); reconnecting every %.1f s", self.address, why, self.cfg.reconnect_s)
        else:
            log.warning("nanonis: %s unreachable (%s); retrying every %.1f s", self.address, why, self.cfg.reconnect_s)

    def _run(self) -> None:
        timeout_ms = int(round(self.cfg.wait_timeout_s * 1000))
        while not self._stop.is_set():
            try:
                client = NanonisClient(self.cfg.host, self.cfg.port, self._stop)
            except OSError as exc:
                self._set_state("down", exc.strerror or str(exc))
                self._stop.wait(self.cfg.reconnect_s)
                continue
            self._set_state("connected")
            pause = 0.0
            try:
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    reply = client.wait_end_of_scan(timeout_ms)
                    early = (reply.timed_out or reply.error_status != 0) and \
                        time.monotonic() - t0 < 0.5 * self.cfg.wait_timeout_s
                    self._on_reply(reply)
                    if early:  # back off exponentially, up to the timeout asked for
                        pause = min(max(2 * pause, _BACKOFF_START_S), max(self.cfg.wait_timeout_s, _BACKOFF_START_S))
                        self._count("backoffs")
                        self._stop.wait(pause)
                    else:
                        pause = 0.0
            except (NanonisError, OSError) as exc:
                if self._stop.is_set():
                    break
                if isinstance(exc, NanonisError) and "closed" not in exc.reason:
                    self._count("errors")
                self._set_state("down", getattr(exc, "reason", None) or str(exc))
                self._stop.wait(self.cfg.reconnect_s)
            except Exception:  # noqa: BLE001 - never let the thread die
                log.exception("nanonis: unexpected error; reconnecting")
                self._count("errors")
                self._set_state("down", "unexpected error")
                self._stop.wait(self.cfg.reconnect_s)
            finally:
                client.close()
        with self._lock:
            self._connected = False
        log.info("nanonis: stopped (%s)", self.address)

    def _on_reply(self, reply: WaitResult) -> None:
        if reply.error_status != 0:
            self._count("errors")
            log.error("nanonis: Scan.WaitEndOfScan returned error %d: %s", reply.error_status,
                      _short(reply.error) if reply.error else "(no description)")
            return
        if reply.timed_out:
            self._count("timeouts")
            return
        if not reply.path:
            log.info("nanonis: end of scan without a saved file (auto-save off?)")
            return
        self._hand_on(Path(reply.path))

    def _wait_complete(self, path: Path) -> str | None:
        """None once ``path`` is complete; else why it never completed (after ``complete_wait_s``)."""
        deadline = time.monotonic() + self.complete_wait_s
        size, expected = -1, None
        while True:
            try:
                size = path.stat().st_size
                if path.suffix.lower() != ".sxm":
                    return None
                expected = expected_file_size(path, self.roots)
                if expected is not None and size >= expected:
                    return None  # larger than announced: the reader says why
            except FileNotFoundError:
                size = -1
            except ScanFormatError:
                return None  # can never become valid: hand it on, the reader records why
            except OSError as exc:
                log.debug("nanonis: %s not readable yet (%s)", path, exc)
            if time.monotonic() >= deadline or self._stop.is_set():
                break
            self._stop.wait(0.05)
        if size < 0:
            return f"incomplete after {self.complete_wait_s:.0f} s: file not found"
        if expected is None:
            return f"incomplete after {self.complete_wait_s:.0f} s: header not complete ({size} bytes)"
        return f"incomplete after {self.complete_wait_s:.0f} s: {size} of the {expected} bytes its header announces"

    def _hand_on(self, path: Path) -> None:
        shown = _short(str(path))
        data: bytes | None = None
        error: str | None = None
        try:
            if self.roots is not None:
                self.roots.resolve(path)
            error = self._wait_complete(path)
            data, _ = read_regular(path, self.roots, MAX_FILE_BYTES)
            fid, size = hashlib.sha256(data).hexdigest(), len(data)
        except (OSError, RefusedPathError) as exc:
            if isinstance(exc, RefusedPathError):
                self._count("refused")
                error = f"refused ({exc.reason})"
            else:
                error = error or f"cannot read it ({exc.strerror or exc})"
            fid, size, data = hashlib.sha256(b"missing:" + str(path).encode("utf-8", "surrogateescape")).hexdigest(), 0, None
        if error:
            error = f"nanonis reported {shown}: {error}"
            log.warning("%s", error)
            self._count("errors")
        try:
            if self._known(fid):
                self._count("duplicates")
                log.info("nanonis: %s skipped, same content (sha256 %s) already processed", _short(path.name), fid[:12])
                return
        except Exception as exc:  # noqa: BLE001
            log.warning("nanonis: cannot check %s against the store (%s)", _short(path.name), exc)
        item = Arrival(path=path, frame_id=fid, size=size, received_at=now_utc(), received_mono=time.monotonic(),
                       error=error, source=self.name, kind="file", meta={"name": path.name[:255]},
                       data=data if not error else None)
        try:
            self._submit(item)
        except Exception as exc:  # noqa: BLE001 - store full/locked: log, count, go on
            self._count("submit_errors")
            log.error("nanonis: %s could not be submitted: %s", _short(path.name), exc)
            return
        if not error:
            self._count("scans")
