"""The session as Bluesky event-model documents, so facilities running Bluesky / Tiled can ingest
the counts (``pip install "stm-agent[bluesky]"``, package ``event-model``).

One agent run = one Bluesky *run*: a ``start`` document when the agent starts (``plan_name``
``stm-agent``, ``agent_id``, ``config_digest``), a ``descriptor`` of the ``primary`` stream, one
``event`` per ok frame, a ``stop`` document when the agent stops (``num_events``). Error frames
are not events (they are in the store). The documents are built with
:func:`event_model.compose_run`, which validates each against event-model's JSON schemas.

Event data keys (all scalars, ``shape: []``): ``frame_id`` and ``name`` (strings),
``n_objects`` (integer), ``count_<species>`` per species incl. ``other`` (integer; characters other
than letters, digits, ``_``, ``-`` in a species name become ``_``: event-model keys may not hold
``.``), ``density_nm2`` (counted objects per nm^2 of acquired area), ``bias_V``, ``setpoint_A``,
``pixel_size_nm`` (x), ``latency_ms`` (numbers or null). event-model requires the same data keys
for every descriptor of a stream, so a change of the species set (the reference library was
edited) starts a new stream, ``primary_2``, ``primary_3`` ... (a set seen before goes back to its
stream).

Output: :meth:`BlueskyRecorder.to_jsonl` appends ``[name, document]`` lines to
``<folder>/<start uid>.jsonl`` (the suitcase-jsonl layout, which ``databroker`` / Tiled importers
read); or pass any ``emit(name, doc)`` callable (a ``bluesky`` RunEngine subscriber, a Kafka
producer ...).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from stm_agent.agent.errors import ConfigError
from stm_agent.agent.triggers import frame_area_nm2

__all__ = ["BlueskyRecorder", "data_key"]

_KEY_RE = re.compile(r"[^A-Za-z0-9_-]")


def data_key(species: str) -> str:
    """Event data key of a species' count: ``count_<species>`` with unsafe characters as ``_``."""
    return "count_" + _KEY_RE.sub("_", species)


def _event_model():
    try:
        import event_model
    except ImportError:
        raise ConfigError('bluesky.enabled needs the event-model package: pip install "stm-agent[bluesky]"') from None
    return event_model


class BlueskyRecorder:
    """Emits one Bluesky run for the agent session.

    Parameters
    ----------
    emit : callable(name, doc)
        Receives every document (``"start"``, ``"descriptor"``, ``"event"``, ``"stop"``).
    agent_id, config_digest : str
        Recorded in the start document.
    metadata : dict, optional
        More start-document metadata (sample, operator ...).

    Raises
    ------
    ConfigError
        event-model is not installed.
    """

    def __init__(self, emit: Callable[[str, dict[str, Any]], None], *, agent_id: str, config_digest: str | None = None,
                 metadata: dict[str, Any] | None = None):
        em = _event_model()
        self._emit = emit
        self._lock = threading.Lock()
        md = {"plan_name": "stm-agent", "agent_id": agent_id, "config_digest": config_digest,
              "source": "stm-agent", **(metadata or {})}
        self._run = em.compose_run(metadata={k: v for k, v in md.items() if v is not None})
        self.start_doc = self._run.start_doc
        self._emit("start", self.start_doc)
        self._descriptors: dict[tuple[str, ...], Any] = {}
        self.events = 0
        self._closed = False

    @classmethod
    def to_jsonl(cls, folder: str | Path, **kw: Any) -> "BlueskyRecorder":
        """A recorder writing ``[name, doc]`` lines into ``<folder>/<start uid>.jsonl`` (flushed per line)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        holder: dict[str, Any] = {"f": None}

        def emit(name: str, doc: dict[str, Any]) -> None:
            line = json.dumps([name, doc], default=str) + "\n"
            if holder["f"] is None:  # the start document comes first and names the file
                holder["f"] = open(folder / f"{doc['uid']}.jsonl", "a", encoding="utf-8")
            holder["f"].write(line)
            holder["f"].flush()
            if name == "stop":
                holder["f"].close()

        rec = cls(emit, **kw)
        rec.path = folder / f"{rec.start_doc['uid']}.jsonl"
        return rec

    def _describe(self, species: list[str]) -> Any:
        num = {"source": "stm-agent", "dtype": "number", "shape": []}
        integer = {"source": "stm-agent", "dtype": "integer", "shape": []}
        text = {"source": "stm-agent", "dtype": "string", "shape": []}
        keys = {"frame_id": text, "name": text, "n_objects": integer, "density_nm2": {**num, "units": "1/nm^2"},
                "bias_V": {**num, "units": "V"}, "setpoint_A": {**num, "units": "A"},
                "pixel_size_nm": {**num, "units": "nm"}, "latency_ms": {**num, "units": "ms"}}
        for s in species:
            keys[data_key(s)] = dict(integer)
        n = len(self._descriptors)
        bundle = self._run.compose_descriptor(name="primary" if n == 0 else f"primary_{n + 1}", data_keys=keys,
                                              hints={"stm-agent": {"fields": [data_key(s) for s in species]}},
                                              configuration={"species": {"data": {"species": species},
                                                                         "timestamps": {"species": time.time()},
                                                                         "data_keys": {"species": {
                                                                             "source": "stm-agent", "dtype": "array",
                                                                             "shape": [len(species)]}}}})
        self._emit("descriptor", bundle.descriptor_doc)
        self._descriptors[tuple(species)] = bundle
        return bundle

    def frame(self, msg: dict[str, Any], scan: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Emit the event of one ``frame.counts`` message (ok frames only); returns the event document.

        Parameters
        ----------
        msg : dict
            The ``frame.counts`` message.
        scan : dict, optional
            The full scan summary (``range_nm``, ``completeness``) for the density; default ``msg["scan"]``.
        """
        if msg.get("status") != "ok":
            return None
        counts = {str(k): int(v) for k, v in (msg.get("counts") or {}).items()}
        species = sorted(counts)
        sc = scan or msg.get("scan") or {}
        area = frame_area_nm2(sc)
        n = sum(counts.values())
        px = (sc.get("pixel_size_nm") or [None])[0]
        data = {"frame_id": msg.get("frame_id"), "name": msg.get("name") or "", "n_objects": n,
                "density_nm2": n / area if area else None, "bias_V": sc.get("bias_V"),
                "setpoint_A": sc.get("setpoint_A"), "pixel_size_nm": px, "latency_ms": msg.get("latency_ms")}
        data.update({data_key(s): counts[s] for s in species})
        with self._lock:
            if self._closed:
                return None
            bundle = self._descriptors.get(tuple(species)) or self._describe(species)
            now = time.time()
            ev = bundle.compose_event(data=data, timestamps={k: now for k in data})
            self._emit("event", ev)
            self.events += 1
        return ev

    def close(self, exit_status: str = "success", reason: str = "") -> dict[str, Any] | None:
        """Emit the stop document (idempotent); returns it."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            stop = self._run.compose_stop(exit_status=exit_status, reason=reason)
            self._emit("stop", stop)
            return stop
