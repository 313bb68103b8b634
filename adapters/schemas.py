"""JSON Schemas (draft 2020-12) of the messages the agent publishes and of its query replies.

One file per topic in ``adapters/schemas/``: ``<topic>.schema.json`` for ``frame.counts``, ``trigger.fired``,
``frame.detections``, ``agent.status``, ``agent.heartbeat`` and ``query.reply`` (the reply of the
query endpoint, see :mod:`adapters.query`). The schemas are the contract documented in
``docs/messages.md``; version ``schema: 1`` (:data:`adapters.zmq_io.SCHEMA`).

:func:`validate` checks a message with ``jsonschema`` (``pip install "stm-agent[schemas]"``); an
invalid message raises :class:`MessageSchemaError` naming the topic and the key. The agent itself
never validates at run time (its messages are built to the schemas; the tests check them).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from stm_agent.agent.errors import StmAgentError

__all__ = ["SCHEMA_DIR", "TOPICS", "MessageSchemaError", "schema_for", "validate"]


SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
TOPICS = ("frame.counts", "frame.detections", "agent.status", "agent.heartbeat", "trigger.fired", "query.reply")


class MessageSchemaError(StmAgentError, ValueError):
    """A message does not follow the schema of its topic.

    Attributes
    ----------
    topic : str
        The topic (or ``query.reply``).
    key : str
        Where in the message: dotted path such as ``scan.pixels[0]`` or ``counts.Br``; for a
        missing key the name of that key; ``<message>`` for the message as a whole.
    reason : str
        What is wrong.
    """

    def __init__(self, topic: str, key: str, reason: str):
        self.topic, self.key, self.reason = topic, key, reason
        super().__init__(f"{topic}: invalid message at key {key!r}: {reason}")


@lru_cache(maxsize=None)
def _load(topic: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{topic}.schema.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyError(f"no schema for topic {topic!r} (known: {', '.join(TOPICS)}); looked for {path}") from None


def schema_for(topic: str) -> dict[str, Any]:
    """The JSON Schema of ``topic`` (a fresh copy, safe to modify).

    Parameters
    ----------
    topic : str
        One of :data:`TOPICS`.

    Raises
    ------
    KeyError
        Unknown topic (the message lists the known ones).
    """
    return json.loads(json.dumps(_load(topic)))


def _key(path: list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<message>"


# ---------------------------------------------------------------------- jsonschema
@lru_cache(maxsize=None)
def _jsonschema_validator(topic: str) -> Any:
    import jsonschema
    from referencing import Registry, Resource

    resources = [(s["$id"], Resource.from_contents(s)) for s in (_load(t) for t in TOPICS)]
    registry = Registry().with_resources(resources)
    cls = jsonschema.validators.validator_for(_load(topic))
    return cls(_load(topic), registry=registry)


def _with_jsonschema(topic: str, message: Any) -> None:
    from jsonschema.exceptions import best_match

    err = best_match(_jsonschema_validator(topic).iter_errors(message))
    if err is None:
        return
    path = list(err.absolute_path)
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [k for k in err.validator_value if k not in err.instance]
        raise MessageSchemaError(topic, _key(path + missing[:1]), "required key missing")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set((err.schema or {}).get("properties", {}))
        extra = [k for k in err.instance if k not in known]
        raise MessageSchemaError(topic, _key(path + extra[:1]), "key not allowed by the schema")
    raise MessageSchemaError(topic, _key(path), err.message)


def validate(topic: str, message: Any) -> None:
    """Check ``message`` against the schema of ``topic`` (with ``jsonschema``).

    Parameters
    ----------
    topic : str
        One of :data:`TOPICS`.
    message : dict
        The decoded JSON message (as a subscriber receives it, or a query reply).

    Raises
    ------
    MessageSchemaError
        The message is invalid; names the topic and the failing key.
    KeyError
        Unknown topic.
    ImportError
        jsonschema is not installed (``pip install "stm-agent[schemas]"``).
    """
    _load(topic)
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        raise ImportError('validating messages needs jsonschema: pip install "stm-agent[schemas]"') from None
    _with_jsonschema(topic, message)
