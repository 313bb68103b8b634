"""Query endpoint for late joiners: a ZeroMQ REP socket answering short text requests with JSON.

A subscriber that connects after a frame was published never sees it (ZeroMQ "slow joiner"); it
asks the agent instead. Requests are one UTF-8 text frame:

* ``latest``: the ``frame.counts`` message of the most recent frame;
* ``frame <frame_id>``: the ``frame.counts`` message of that frame (the full sha256 hex, or a
  unique prefix of at least 8 hex characters);
* ``since <frame_seq>``: every frame recorded after ``frame_seq`` (``frame.counts`` messages in
  ``frame_seq`` order, at most :data:`adapters.store.SINCE_LIMIT` per reply; ``more`` says to ask
  again from the last one). A subscriber that sees a gap in ``frame_seq`` fills it with this.
* ``status``: the agent's state (the fields of ``agent.heartbeat``).

Replies are one JSON object (never pickle), valid against ``adapters/schemas/query.reply.schema.json``.
The SERVER builds the envelope, so handlers only return the body::

    {"schema": 1, "agent_id": "...", "request": "latest" | "frame", "frame": {...frame.counts...},
     "detections": [...]}   # detections only when the handler's frame had a "detections" key
    {"schema": 1, "agent_id": "...", "request": "since", "frames": [{...frame.counts...}, ...],
     "more": false, "last_frame_seq": 42}
    {"schema": 1, "agent_id": "...", "request": "status", "status": {...heartbeat fields...}}
    {"schema": 1, "agent_id": "...", "request": <command or null>, "error": "why"}

A malformed or unknown request, an unknown frame, or a handler that raises gets an ``error``
reply; the server never dies of a request. The REP socket has ZMQ_MAXMSGSIZE set
(:data:`MAX_REQUEST_BYTES`): ZeroMQ drops a peer that sends a larger request before it is
buffered (a 200 MB request costs nothing).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Callable

import zmq

from stm_agent.adapters.zmq_io import SCHEMA, curve_authenticator, curve_client_keys, load_curve_secret
from stm_agent.agent.jsonsafe import jsonable
from stm_agent.agent.errors import PublishError

__all__ = ["QueryServer", "query", "store_handler", "since_body", "GapFiller", "Handler", "MAX_REQUEST_BYTES"]

log = logging.getLogger(__name__)

Handler = Callable[[str, "str | None"], "dict[str, Any] | None"]

_HEX_ID = re.compile(r"^[0-9a-f]{8,64}$")
_MAX_REQUEST = 1024  # bytes; longer requests are refused without parsing
#: ZMQ_MAXMSGSIZE of the query socket: a larger request frame disconnects its sender unread.
MAX_REQUEST_BYTES = 4096
_COMMANDS = "latest, frame <frame_id>, since <frame_seq> or status"
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
    curve_secret_file, curve_clients_dir : path, optional
        As :class:`adapters.zmq_io.Publisher` (``publish.curve_secret_file`` /
        ``publish.curve_clients_dir``): answer only CURVE clients that pin the agent's key, and
        with a clients folder only those whose certificate is listed. The agent gives the query
        socket the same keys as its publisher: the frames it publishes are never answered in clear.

    Raises
    ------
    PublishError
        A CURVE certificate or client folder cannot be read.

    Notes
    -----
    The socket has LINGER 0: a reply to a client that has gone is dropped at once on stop.
    """

    def __init__(self, endpoint: str, handler: Handler, agent_id: str = "stm-agent",
                 context: zmq.Context | None = None, curve_secret_file: Any = None, curve_clients_dir: Any = None):
        self._curve = load_curve_secret(curve_secret_file) if curve_secret_file is not None else None
        if curve_clients_dir is not None:
            if self._curve is None:
                raise PublishError(endpoint, "publish.curve_clients_dir needs publish.curve_secret_file")
            curve_authenticator(context or zmq.Context.instance(), curve_clients_dir)
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
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if self._curve is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self._curve
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
                    sock.send(json.dumps(jsonable(reply), allow_nan=False, separators=(",", ":")).encode("utf-8"))
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
            return self._envelope(None, error=f"empty request; send {_COMMANDS}")
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
        elif command == "since":
            if len(args) != 1 or not args[0].isdigit() or len(args[0]) > 18:
                return self._envelope(command, error="since needs one frame_seq: an integer >= 0")
            arg = str(int(args[0]))
        else:
            return self._envelope(None, error=f"unknown request {parts[0][:40]!r}; send {_COMMANDS}")
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
        if command == "since":
            return self._envelope(command, frames=body.get("frames", []), more=bool(body.get("more")),
                                  last_frame_seq=int(body.get("last_frame_seq") or 0))
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
        if command == "since":
            return since_body(store, int(arg or 0))
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
        msg["frame_seq"] = row["frame_seq"]
        return msg

    return handle


def since_body(store: Any, frame_seq: int) -> dict[str, Any]:
    """The body of a ``since <frame_seq>`` reply from a results store.

    Returns
    -------
    dict
        ``frames``: the stored ``frame.counts`` messages of the frames recorded after
        ``frame_seq`` (oldest first, at most :data:`adapters.store.SINCE_LIMIT`, without ``seq``:
        a reply is not a publication; each has its ``frame_seq``); ``more``: more frames follow the
        last one; ``last_frame_seq``: the highest recorded.
    """
    from stm_agent.adapters.store import SINCE_LIMIT

    rows = store.since(frame_seq, SINCE_LIMIT + 1)
    frames = []
    for r in rows[:SINCE_LIMIT]:
        msg = dict(r.get("message") or {})
        if not msg:  # recorded by an older agent without its message: the essentials
            msg = {"frame_id": r["frame_id"], "source": r["source"], "path": r["path"], "name": r["name"],
                   "status": r["status"], "reason": r["reason"], "counts": r["counts"]}
        msg.pop("seq", None)
        msg["frame_seq"] = r["frame_seq"]
        frames.append(msg)
    return {"frames": frames, "more": len(rows) > SINCE_LIMIT, "last_frame_seq": store.last_frame_seq()}


def query(endpoint: str, request: str, timeout_ms: int = 2000, context: zmq.Context | None = None,
          curve_server_key: str | None = None, curve_secret_file: Any = None) -> dict[str, Any]:
    """Send one request to an agent's query endpoint and return its JSON reply.

    Parameters
    ----------
    endpoint : str
        The agent's query endpoint, e.g. ``tcp://127.0.0.1:5557``.
    request : str
        ``latest``, ``frame <frame_id>``, ``since <frame_seq>`` or ``status``.
    timeout_ms : int
        How long to wait for the answer, ms.
    context : zmq.Context, optional
    curve_server_key : str, optional
        The agent's CURVE public key (Z85) when it serves with ``publish.curve_secret_file``.
    curve_secret_file : path, optional
        With ``curve_server_key``: this client's own ``zmq.auth`` secret certificate (needed when
        the agent admits listed clients only); without it an ephemeral key pair is used.

    Returns
    -------
    dict
        The reply (see the module docstring); an ``error`` key means the agent refused the request.

    Raises
    ------
    PublishError
        No answer within ``timeout_ms`` (no agent there, or a CURVE agent that does not admit this
        client), malformed endpoint or CURVE key, or a reply that is not a JSON object.
    """
    keys = None
    if curve_server_key:
        server, public, secret = curve_client_keys(curve_server_key)
        if curve_secret_file is not None:
            public, secret = load_curve_secret(curve_secret_file)
        keys = (server, public, secret)
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise PublishError(endpoint, f"cannot connect the ZeroMQ query (REQ) socket ({exc})") from exc
        sock.send(request.encode("utf-8"))
        if not sock.poll(max(int(timeout_ms), 0), zmq.POLLIN):
            hint = ("; with CURVE, is this client's certificate in the agent's publish.curve_clients_dir?"
                    if keys is not None else "")
            raise PublishError(endpoint, f"no answer within {int(timeout_ms)} ms (is the agent running and "
                                         f"publish.query_endpoint set?{hint})")
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


class GapFiller:
    """Follows ``frame_seq`` on a subscriber's side and fills gaps from the query endpoint.

    ``frame.counts`` messages carry a gap-free ``frame_seq``; a PUB message can still be lost
    (the agent killed right after a non-blocking send, a slow or late subscriber). Feed every
    ``frame.counts`` to :meth:`on_frame` and every ``agent.heartbeat`` to :meth:`on_heartbeat`:
    each returns the frames to hand on, in ``frame_seq`` order, as ``(message, recovered)``;
    ``recovered`` is True for frames fetched with ``since <frame_seq>``. Frames seen before (a
    ``redelivered`` copy, a recovered frame published late) are not handed on twice.

    Parameters
    ----------
    query_endpoint : str | None
        The agent's query endpoint; None = gaps are counted (:attr:`missed`) but not filled.
    timeout_ms : int
        Per query.
    context : zmq.Context, optional
    curve_server_key, curve_secret_file : optional
        As :func:`query` (an agent serving with CURVE).

    Attributes
    ----------
    last : int | None
        Highest ``frame_seq`` handed on (None until the first frame or heartbeat).
    recovered, missed : int
        Frames fetched to fill gaps; frames known to be missing that could not be fetched.
    """

    def __init__(self, query_endpoint: str | None, timeout_ms: int = 2000, context: zmq.Context | None = None,
                 curve_server_key: str | None = None, curve_secret_file: Any = None):
        self.query_endpoint = query_endpoint
        self._curve = {"curve_server_key": curve_server_key, "curve_secret_file": curve_secret_file}
        self.timeout_ms = int(timeout_ms)
        self._ctx = context
        self.last: int | None = None
        self.recovered = 0
        self.missed = 0
        self._seen: "OrderedDict[str, None]" = OrderedDict()

    def _remember(self, frame_id: str) -> bool:
        """True if new."""
        if frame_id in self._seen:
            return False
        self._seen[frame_id] = None
        if len(self._seen) > 10000:
            self._seen.popitem(last=False)
        return True

    def _fill(self, upto: int | None) -> list[tuple[dict[str, Any], bool]]:
        """Fetch frames after :attr:`last` (up to ``upto`` when given, or all)."""
        out: list[tuple[dict[str, Any], bool]] = []
        if self.last is None:
            return out
        want = (upto - self.last) if upto is not None else 0
        if self.query_endpoint is None:
            self.missed += max(want, 0)
            if upto is not None:
                self.last = upto
            return out
        while upto is None or self.last < upto:
            try:
                reply = query(self.query_endpoint, f"since {self.last}", self.timeout_ms, self._ctx, **self._curve)
            except PublishError as exc:
                log.warning("cannot fill the frame_seq gap after %d: %s", self.last, exc)
                break
            frames = reply.get("frames") or []
            for f in frames:
                fs = f.get("frame_seq")
                if not isinstance(fs, int) or fs <= self.last or (upto is not None and fs > upto):
                    continue
                self.last = fs
                if self._remember(str(f.get("frame_id"))):
                    self.recovered += 1
                    out.append((f, True))
            if not frames or not reply.get("more"):
                break
        if upto is not None and self.last < upto:
            self.missed += upto - self.last
            self.last = upto
        return out

    def on_frame(self, msg: dict[str, Any]) -> list[tuple[dict[str, Any], bool]]:
        """A ``frame.counts`` arrived: the frames to hand on (missed ones first, then ``msg``)."""
        fs = msg.get("frame_seq")
        out: list[tuple[dict[str, Any], bool]] = []
        if isinstance(fs, int):
            if self.last is not None and fs > self.last + 1:
                out = self._fill(fs - 1)
            if self.last is None or fs > self.last:
                self.last = fs
        if self._remember(str(msg.get("frame_id"))):
            out.append((msg, False))
        return out

    def on_heartbeat(self, hb: dict[str, Any]) -> list[tuple[dict[str, Any], bool]]:
        """An ``agent.heartbeat`` arrived: frames recorded that this subscriber has not seen."""
        top = hb.get("last_frame_seq")
        if not isinstance(top, int):
            return []
        if self.last is None:
            self.last = top  # joined now: what came before is history, not a gap
            return []
        if top > self.last:
            return self._fill(top)
        return []
