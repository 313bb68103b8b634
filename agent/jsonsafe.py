"""Standard JSON from what the pipeline produces: one place that turns NaN/inf into null.

RFC 8259 has no NaN; ``json.dumps`` would write ``NaN``, which strict parsers (browsers,
jsonschema, other languages) reject. Used by the publisher, the query endpoint, the results store
and the evaluation report.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` as standard JSON types, recursively.

    Non-finite floats -> None; numpy scalars and arrays -> Python numbers and lists; tuples ->
    lists; dict keys -> str; datetimes -> ISO 8601; anything else -> ``str(obj)``.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return jsonable(obj.tolist())
    if hasattr(obj, "isoformat"):  # datetime
        return obj.isoformat()
    return str(obj)
