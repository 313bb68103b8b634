"""JSON Schemas (draft 2020-12) of the messages the agent publishes and of its query replies.

One file per topic in ``adapters/schemas/``: ``<topic>.schema.json`` for ``frame.counts``, ``trigger.fired``,
``frame.detections``, ``agent.status``, ``agent.heartbeat`` and ``query.reply`` (the reply of the
query endpoint, see :mod:`adapters.query`). The schemas are the contract documented in
``docs/messages.md``; version ``schema: 1`` (:data:`adapters.zmq_io.SCHEMA`).

:func:`validate` uses ``jsonschema`` when it is installed (``pip install "stm-agent[test]"``) and
otherwise a small built-in validator that understands exactly the keywords these files use.
Either way an invalid message raises :class:`MessageSchemaError` naming the topic and the key.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from stm_agent.agent.errors import StmAgentError

__all__ = ["SCHEMA_DIR", "TOPICS", "MessageSchemaError", "schema_for", "validate"]

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------- built-in fallback
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class _Invalid(Exception):
    def __init__(self, path: list[Any], reason: str):
        self.path, self.reason = path, reason


def _resolve(ref: str, base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(target schema, its document) of ``ref`` relative to the document ``base``."""
    file, _, pointer = ref.partition("#")
    doc = _load(file.removesuffix(".schema.json")) if file else base
    node: Any = doc
    for part in filter(None, pointer.split("/")):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, doc


def _check(s: dict[str, Any] | bool, v: Any, path: list[Any], doc: dict[str, Any]) -> None:
    """Raise :class:`_Invalid` at the first violation of schema ``s`` by value ``v``."""
    if s is True:
        return
    if s is False:
        raise _Invalid(path, "not allowed by the schema")
    if "$ref" in s:
        target, tdoc = _resolve(s["$ref"], doc)
        _check(target, v, path, tdoc)
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_TYPES[t](v) for t in types):
            raise _Invalid(path, f"{v!r} is not of type {' or '.join(types)}")
    if "const" in s and not (v == s["const"] and type(v) is type(s["const"])):
        raise _Invalid(path, f"{v!r} is not {s['const']!r}")
    if "enum" in s and v not in s["enum"]:
        raise _Invalid(path, f"{v!r} is not one of {s['enum']}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in s and v < s["minimum"]:
            raise _Invalid(path, f"{v!r} is less than the minimum of {s['minimum']}")
        if "maximum" in s and v > s["maximum"]:
            raise _Invalid(path, f"{v!r} is greater than the maximum of {s['maximum']}")
    if isinstance(v, str):
        if len(v) < s.get("minLength", 0):
            raise _Invalid(path, f"{v!r} is too short")
        if "pattern" in s and not re.search(s["pattern"], v):
            raise _Invalid(path, f"{v!r} does not match {s['pattern']!r}")
    if isinstance(v, dict):
        for k in s.get("required", []):
            if k not in v:
                raise _Invalid(path + [k], "required key missing")
        props = s.get("properties", {})
        for k, item in v.items():
            if "propertyNames" in s:
                _check(s["propertyNames"], k, path + [k], doc)
            if k in props:
                _check(props[k], item, path + [k], doc)
            elif "additionalProperties" in s:
                if s["additionalProperties"] is False:
                    raise _Invalid(path + [k], "key not allowed by the schema")
                _check(s["additionalProperties"], item, path + [k], doc)
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0):
            raise _Invalid(path, f"expected at least {s['minItems']} items, got {len(v)}")
        prefix = s.get("prefixItems", [])
        for i, item in enumerate(v):
            if i < len(prefix):
                _check(prefix[i], item, path + [i], doc)
            elif "items" in s:
                if s["items"] is False:
                    raise _Invalid(path + [i], f"expected at most {len(prefix)} items")
                _check(s["items"], item, path + [i], doc)
    for sub in s.get("allOf", []):
        _check(sub, v, path, doc)
    if "if" in s:
        try:
            _check(s["if"], v, path, doc)
            matched = True
        except _Invalid:
            matched = False
        if matched and "then" in s:
            _check(s["then"], v, path, doc)
    if "oneOf" in s:
        fails = []
        for sub in s["oneOf"]:
            try:
                _check(sub, v, path, doc)
                return
            except _Invalid as exc:
                fails.append(exc)
        # report the alternative that got furthest (deepest path)
        raise max(fails, key=lambda e: len(e.path))


def _builtin(topic: str, message: Any) -> None:
    try:
        _check(_load(topic), message, [], _load(topic))
    except _Invalid as exc:
        raise MessageSchemaError(topic, _key(exc.path), exc.reason) from None


def validate(topic: str, message: Any, *, use_jsonschema: bool | None = None) -> None:
    """Check ``message`` against the schema of ``topic``.

    Parameters
    ----------
    topic : str
        One of :data:`TOPICS`.
    message : dict
        The decoded JSON message (as a subscriber receives it, or a query reply).
    use_jsonschema : bool, optional
        None (default): use ``jsonschema`` when it is installed, else the built-in validator;
        True/False forces one (False is for tests of the fallback).

    Raises
    ------
    MessageSchemaError
        The message is invalid; names the topic and the failing key.
    KeyError
        Unknown topic.
    ImportError
        ``use_jsonschema=True`` and jsonschema is not installed.
    """
    _load(topic)
    if use_jsonschema is None:
        try:
            import jsonschema  # noqa: F401
            use_jsonschema = True
        except ImportError:
            use_jsonschema = False
    if use_jsonschema:
        _with_jsonschema(topic, message)
    else:
        _builtin(topic, message)
