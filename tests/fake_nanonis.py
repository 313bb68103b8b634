"""A fake Nanonis TCP programming interface for tests (127.0.0.1, ephemeral port).

Speaks the 40-byte header protocol and answers ``Scan.WaitEndOfScan`` from a queue the test
feeds: :meth:`FakeNanonis.push_path`, :meth:`push_timeout`, :meth:`push_error`, :meth:`push_drop`
(close the connection instead of replying). With nothing queued it waits the requested timeout
(capped at ``max_wait_s``) and replies "timed out". The trigger actions ``Scan.Action`` and
``ZCtrl.Withdraw`` are answered with "no error" and recorded in :attr:`FakeNanonis.actions`
(command, raw request body); every connection gets its own thread, so an action arrives while
another client is blocked in ``Scan.WaitEndOfScan``. Every reply is sent ``chunk`` bytes at a time
with ``chunk_delay_s`` pauses (TCP_NODELAY), so a client that assumes one ``recv`` per reply fails.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time

HEADER = struct.Struct(">32siHH")


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def wait_reply_body(timed_out: bool, path: str = "", error_status: int = 0, error: str = "") -> bytes:
    """Body of a Scan.WaitEndOfScan reply (path and error as UTF-8)."""
    p, e = path.encode("utf-8"), error.encode("utf-8")
    return struct.pack(">Ii", int(timed_out), len(p)) + p + struct.pack(">Ii", error_status, len(e)) + e


class FakeNanonis:
    """A threaded fake server; ``start()`` binds 127.0.0.1:0 (read :attr:`port`), ``stop()`` closes."""

    def __init__(self, chunk: int = 7, chunk_delay_s: float = 0.0005, max_wait_s: float = 0.2, port: int = 0):
        self.chunk, self.chunk_delay_s, self.max_wait_s = chunk, chunk_delay_s, max_wait_s
        self.items: queue.Queue = queue.Queue()
        self.requests: list[tuple[str, int]] = []  # (command, timeout ms)
        self.actions: list[tuple[str, bytes]] = []  # (command, request body) of Scan.Action, ZCtrl.Withdraw
        self.connections = 0
        self.replies_sent = 0
        self._stop = threading.Event()
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", port))
        self._srv.listen(4)
        self._srv.settimeout(0.1)
        self.port: int = self._srv.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-nanonis")

    # ---- what the test feeds
    def push_path(self, path: str) -> None:
        self.items.put(("path", str(path)))

    def push_timeout(self) -> None:
        self.items.put(("timeout", ""))

    def push_error(self, text: str) -> None:
        self.items.put(("error", text))

    def push_drop(self) -> None:
        self.items.put(("drop", ""))

    # ---- server
    def start(self) -> "FakeNanonis":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()

    def __enter__(self) -> "FakeNanonis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(None)
            threading.Thread(target=self._handle, args=(conn,), daemon=True, name="fake-nanonis-conn").start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._session(conn)
        except OSError:  # the client went away mid-reply
            pass
        finally:
            conn.close()

    def _send_chunked(self, conn: socket.socket, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            conn.sendall(data[i:i + self.chunk])
            time.sleep(self.chunk_delay_s)

    def _session(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            head = _recv_exact(conn, HEADER.size)
            if head is None:
                return
            name, size, _flag, _ = HEADER.unpack(head)
            body = _recv_exact(conn, size) if size else b""
            if body is None:
                return
            command = name.rstrip(b"\0").decode("ascii")
            timeout_ms = struct.unpack(">i", body[:4])[0] if len(body) >= 4 else -1
            self.requests.append((command, timeout_ms))
            if command in ("Scan.Action", "ZCtrl.Withdraw"):
                self.actions.append((command, body))
                reply = struct.pack(">Ii", 0, 0)  # error section: no error
            elif command != "Scan.WaitEndOfScan":
                reply = struct.pack(">Ii", 1, 15) + b"unknown command"
            else:
                wait = self.max_wait_s if timeout_ms < 0 else min(timeout_ms / 1000, self.max_wait_s)
                try:
                    kind, value = self.items.get(timeout=wait)
                except queue.Empty:
                    kind, value = "timeout", ""
                if kind == "drop":
                    return
                if kind == "path":
                    reply = wait_reply_body(False, value)
                elif kind == "error":
                    reply = wait_reply_body(False, "", 1, value)
                else:
                    reply = wait_reply_body(True)
            self._send_chunked(conn, HEADER.pack(name, len(reply), 0, 0) + reply)
            self.replies_sent += 1
