"""Live feed of the dashboard: one ZeroMQ SUB socket on the agent's PUB endpoint, fanned out to
every open page (server-sent events).

A thread receives ``frame.counts``, ``agent.heartbeat``, ``agent.status`` and ``trigger.fired``.
For a frame it reads the recorded row back from the store (the agent records before it publishes)
so the page gets the same summary + detections as a page that loads the history, and puts
``(event, data)`` into the asyncio queue of every connected page. A slow page (queue full) loses
its oldest updates, never blocks the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from stm_agent.adapters.dashboard.data import DashboardData, DataError

__all__ = ["LiveHub"]

log = logging.getLogger(__name__)

_TOPICS = ("frame.counts", "agent.heartbeat", "agent.status", "trigger.fired")


class LiveHub:
    """Fans the agent's messages out to the pages.

    Parameters
    ----------
    endpoint : str | None
        The agent's PUB endpoint; None = no live feed (history only).
    data : DashboardData
    """

    def __init__(self, endpoint: str | None, data: DashboardData, queue_size: int = 256):
        self.endpoint, self.data, self.queue_size = endpoint, data, queue_size
        self.heartbeat: dict[str, Any] | None = None
        self.heartbeat_at: float | None = None  # time.time() when it arrived
        self.status: dict[str, Any] | None = None
        self.received = 0
        self._clients: set[asyncio.Queue] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start receiving (call from the server's event loop)."""
        self._loop = loop
        if self.endpoint and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="dashboard-sub")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=self.queue_size)
        with self._lock:
            self._clients.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._clients.discard(q)

    def close_clients(self) -> None:
        """End every page's event stream (before the server stops: open streams would hold it up)."""
        self._broadcast("_close", {})

    @property
    def clients(self) -> int:
        return len(self._clients)

    def health(self) -> dict[str, Any]:
        """Last heartbeat and its age (s), last agent.status, the live endpoint."""
        age = None if self.heartbeat_at is None else round(time.time() - self.heartbeat_at, 3)
        return {"endpoint": self.endpoint, "heartbeat": self.heartbeat, "heartbeat_age_s": age,
                "status": self.status, "pages": self.clients}

    def _broadcast(self, event: str, data: dict[str, Any]) -> None:
        def put() -> None:
            for q in list(self._clients):
                if q.full():
                    try:
                        q.get_nowait()
                    except asyncio.QueueEmpty:
                        pass
                q.put_nowait((event, data))

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(put)

    def handle(self, topic: str, msg: dict[str, Any]) -> None:
        """Turn one agent message into page events (also used by tests without a socket)."""
        self.received += 1
        if topic == "agent.heartbeat":
            self.heartbeat, self.heartbeat_at = msg, time.time()
            self._broadcast("health", self.health())
        elif topic == "agent.status":
            self.status = msg
            if msg.get("state") == "stopping":
                self.heartbeat_at = None
            self._broadcast("health", self.health())
        elif topic == "trigger.fired":
            self._broadcast("trigger", msg)
        elif topic == "frame.counts":
            try:
                frame = self.data.frame(msg["frame_id"])
            except (DataError, KeyError) as exc:
                log.warning("dashboard: frame %s not readable from the store: %s", msg.get("frame_id"), exc)
                return
            frame["seq"] = msg.get("seq")
            self._broadcast("frame", frame)

    def _run(self) -> None:
        from stm_agent.adapters.zmq_io import Subscriber
        from stm_agent.agent.errors import StmAgentError

        try:
            sub = Subscriber(self.endpoint, _TOPICS)
        except StmAgentError as exc:
            log.error("dashboard: no live feed: %s", exc)
            return
        try:
            while not self._stop.is_set():
                got = sub.recv(timeout_ms=200)
                if got is None:
                    continue
                try:
                    self.handle(*got)
                except Exception:  # noqa: BLE001 - one bad message never stops the feed
                    log.exception("dashboard: cannot handle a %s message", got[0])
        finally:
            sub.close()
