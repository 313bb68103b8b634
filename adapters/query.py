"""Query endpoint for late joiners: a ZeroMQ REP socket answering short text requests with JSON.

A subscriber that connects after a frame was published never sees it (ZeroMQ "slow joiner"); it
asks the agent instead. Requests are one UTF-8 text frame:

* ``latest``: the ``frame.counts`` message of the most recent frame;
* ``frame <frame_id>``: the ``frame.counts`` message of that frame (the full sha256 hex, or a
  unique prefix of at least 8 hex characters);
* ``status``: the agent's state (the fields of ``agent.heartbeat``).

Replies are one JSON object (never pickle), valid against ``adapters/schemas/query.reply.schema.json``.
The SERVER builds the envelope, so handlers only return the body::

    {"schema": 1, "agent_id": "...", "request": "latest" | "frame", "frame": {...frame.counts...},
     "detections": [...]}   # detections only when the handler's frame had a "detections" key
    {"schema": 1, "agent_id": "...", "request": "status", "status": {...heartbeat fields...}}
    {"schema": 1, "agent_id": "...", "request": <command or null>, "error": "why"}

A malformed or unknown request, an unknown frame, or a handler that raises gets an ``error``
reply; the server never dies of a request.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any, Callable

import zmq

from stm_agent.adapters.zmq_io import SCHEMA, _jsonable
from stm_agent.agent.errors import PublishError

__all__ = ["QueryServer", "query", "store_handler", "Handler"]

log = logging.getLogger(__name__)

Handler = Callable[[str, "str | None"], "dict[str, Any] | None"]

_HEX_ID = re.compile(r"^[0-9a-f]{8,64}$")
_MAX_REQUEST = 1024  # bytes; longer requests are refused without parsing
_POLL_MS = 50  # worker poll period: bounds how long stop() waits


class QueryServer:
    """A REP socket in its own thread answering ``latest`` / ``frame <id>`` / ``status``.

    Parameters
    ----------
    endpoint : str
        Where to bind, e.g. ``tcp://127.0.0.1:5557`` (``PublishConfig.query_endpoint``); a ``*``
        port picks a free one (read :attr:`endpoint` after :meth:`start`).
    handler : callable(command, argument) -> dict | None
        Called in the server's thread with ``("latest", None)``, ``("frame", "<lower-case hex id
        or prefix>")`` or ``("status", None)``. Returns the body of the reply: the
        ``frame.counts`` message for ``latest``/``frame`` (a ``detections`` key in it is moved
        beside it, to the reply's ``detections``), the heartbeat fields for ``status``;
        None means "not found" (``unknown frame <id>`` / ``no frame recorded yet`` / ``status not
        available``). It may raise :class:`LookupError` with a message for a specific error
        reply; any other exception is logged and answered as ``internal error``.
    agent_id : str
        Put in every reply (with ``schema``).
    context : zmq.Context, optional
        Defaults to ``zmq.Context.instance()``.

    Notes
    -----
    The socket has LINGER 0: a reply to a client that has gone is dropped at once on stop.
    """

    def __init__(self, endpoint: str, handler: Handler, agent_id: str = "stm-agent",
                 context: zmq.Context | None = None):
        self.requested_endpoint = endpoint
        self.endpoint: str = endpoint
        self.handler = handler
        self.agent_id = agent_id
        self.answered = 0  # replies sent (errors included)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> "QueryServer":
        """Bind the socket and start answering.

        Returns
        -------
        QueryServer
            self, with :attr:`endpoint` resolved (``tcp://127.0.0.1:41235``).

        Raises
        ------
        PublishError
            The endpoint cannot be bound (address in use, malformed endpoint).
        RuntimeError
            Already started.
        """
        if self._thread is not None:
            raise RuntimeError("QueryServer.start() called twice")
        sock = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.requested_endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise PublishError(self.requested_endpoint, f"cannot bind the ZeroMQ query (REP) socket ({exc})") from exc
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock  # from here on used by the worker thread only
        self._thread = threading.Thread(target=self._serve, name=f"query {self.endpoint}", daemon=True)
        self._thread.start()
        log.info("answering queries on %s", self.endpoint)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop answering and close the socket; returns within about ``timeout`` s. Idempotent.

        A handler call in progress is finished first (the thread is a daemon: a handler stuck for
        longer than ``timeout`` is left behind and logged).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("query server %s did not stop within %.1f s", self.endpoint, timeout)

    def __enter__(self) -> "QueryServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ worker
    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                try:
                    if not sock.poll(_POLL_MS, zmq.POLLIN):
                        continue
                    frames = sock.recv_multipart()
                    reply = self._answer(frames)
                    sock.send(json.dumps(_jsonable(reply), allow_nan=False, separators=(",", ":")).encode("utf-8"))
                    self.answered += 1
                except zmq.ZMQError as exc:  # e.g. context terminated
                    if self._stop.is_set() or exc.errno == zmq.ETERM:
                        break
                    log.error("query socket %s: %s", self.endpoint, exc)
        finally:
            sock.close(linger=0)
            self._sock = None

    def _envelope(self, request: str | None, **body: Any) -> dict[str, Any]:
        return {"schema": SCHEMA, "agent_id": self.agent_id, "request": request, **body}

    def _answer(self, frames: list[bytes]) -> dict[str, Any]:
        """The reply to one request (never raises)."""
        if len(frames) != 1:
            return self._envelope(None, error=f"expected a request of one text frame, got {len(frames)} frames")
        if len(frames[0]) > _MAX_REQUEST:
            return self._envelope(None, error=f"request longer than {_MAX_REQUEST} bytes")
        try:
            text = frames[0].decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._envelope(None, error="request is not UTF-8 text")
        parts = text.split()
        if not parts:
            return self._envelope(None, error="empty request; send latest, frame <frame_id> or status")
        command, args = parts[0].lower(), parts[1:]
        arg: str | None = None
        if command in ("latest", "status"):
            if args:
                return self._envelope(command, error=f"{command} takes no argument")
        elif command == "frame":
            if len(args) != 1 or not _HEX_ID.match(args[0].lower()):
                return self._envelope(command, error="frame needs one frame_id: the sha256 hex, or a unique "
                                                     "prefix of at least 8 hex characters")
            arg = args[0].lower()
        else:
            return self._envelope(None, error=f"unknown request {parts[0][:40]!r}; send latest, "
                                              "frame <frame_id> or status")
        try:
            body = self.handler(command, arg)
        except LookupError as exc:
            return self._envelope(command, error=str(exc.args[0] if exc.args else exc))
        except Exception as exc:  # noqa: BLE001 - a request never kills the server
            log.exception("query %r failed", text)
            return self._envelope(command, error=f"internal error: {type(exc).__name__}: {exc}")
        if body is None:
            missing = {"latest": "no frame recorded yet", "frame": f"unknown frame {arg}",
                       "status": "status not available"}
            return self._envelope(command, error=missing[command])
        if not isinstance(body, dict):
            log.error("query handler returned %s for %r, expected a dict", type(body).__name__, text)
            return self._envelope(command, error="internal error: the handler did not return an object")
        if command == "status":
            return self._envelope(command, status=body)
        frame = dict(body)
        detections = frame.pop("detections", None)  # kept beside the frame.counts body, not in it
        reply = self._envelope(command, frame=frame)
        if detections is not None:
            reply["detections"] = detections
        return reply


def store_handler(store: Any, status: Callable[[], dict[str, Any] | None]) -> Handler:
    """A handler answering frames from a results store and ``status`` from a function.

    Parameters
    ----------
    store : adapters.store.ResultStore
        ``latest`` / ``frame`` answer the stored ``message`` column (the ``frame.counts`` message
        as published) of :meth:`ResultStore.latest` / :meth:`ResultStore.get` (which accepts a
        unique prefix of >= 8 hex characters).
    status : callable() -> dict | None
        Returns the heartbeat fields (what ``agent.heartbeat`` carries, without ``seq``).

    Returns
    -------
    callable(command, argument) -> dict | None
        Raises LookupError for a frame recorded without its message (older store).
    """

    def handle(command: str, arg: str | None) -> dict[str, Any] | None:
        if command == "status":
            return status()
        if command == "latest":
            rows = store.latest(1)
            row = rows[0] if rows else None
        else:
            row = store.get(arg)
        if row is None:
            return None
        if not row.get("message"):
            raise LookupError(f"frame {row['frame_id']} was recorded without its message (older agent)")
        msg = dict(row["message"])
        msg.pop("seq", None)  # the seq of a past publication is not this reply's
        return msg

    return handle


def query(endpoint: str, request: str, timeout_ms: int = 2000, context: zmq.Context | None = None) -> dict[str, Any]:
    """Send one request to an agent's query endpoint and return its JSON reply.

    Parameters
    ----------
    endpoint : str
        The agent's query endpoint, e.g. ``tcp://127.0.0.1:5557``.
    request : str
        ``latest``, ``frame <frame_id>`` or ``status``.
    timeout_ms : int
        How long to wait for the answer, ms.
    context : zmq.Context, optional

    Returns
    -------
    dict
        The reply (see the module docstring); an ``error`` key means the agent refused the request.

    Raises
    ------
    PublishError
        No answer within ``timeout_ms`` (no agent there), malformed endpoint, or a reply that is
        not a JSON object.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise PublishError(endpoint, f"cannot connect the ZeroMQ query (REQ) socket ({exc})") from exc
        sock.send(request.encode("utf-8"))
        if not sock.poll(max(int(timeout_ms), 0), zmq.POLLIN):
            raise PublishError(endpoint, f"no answer within {int(timeout_ms)} ms (is the agent running and "
                                         "publish.query_endpoint set?)")
        data = sock.recv()
    finally:
        sock.close(linger=0)
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(endpoint, f"reply is not UTF-8 JSON ({exc})") from exc
    if not isinstance(reply, dict):
        raise PublishError(endpoint, "reply is not a JSON object")
    return reply
