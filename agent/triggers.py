"""Triggers: declarative rules on the per-frame counts that decide the next experiment.

A rule (one item of ``triggers:`` in the YAML) is plain data, validated by pydantic when the
configuration is loaded; nothing the user writes is evaluated as code::

    triggers:
      - name: many_unknown            # letters, digits, _ . -; unique
        metric: other_fraction        # count | density | fraction | other_fraction | no_objects
        comparison: ">="              # > >= < <= == !=
        value: 0.5
        window: 3                     # over the last 3 ok frames (default 1)
        hysteresis: 0.1               # re-armed only once other_fraction < 0.5 - 0.1
        cooldown_s: 300               # and at least 300 s between two firings
        actions:
          - {type: publish}           # trigger.fired on the PUB socket (default action)
          - {type: command, argv: [python3, notify.py], timeout_s: 20}   # event JSON on stdin
          - {type: nanonis, action: scan_pause, dry_run: true}           # allow-listed TCP command

Metrics, over the ``window`` most recent frames with status ok (error frames are skipped):

* ``count``: mean number of counted objects of ``species`` per frame (all species when omitted);
* ``density``: counted objects of ``species`` per nm^2 of acquired area (sum of counts / sum of
  scanned area x completeness);
* ``fraction``: objects of ``species`` / objects of ``of`` (default: every species incl. ``other``),
  e.g. ``species: [after], of: [before, after]``; undefined (no decision) when ``of`` counts 0;
* ``other_fraction``: objects counted ``other`` / all counted objects (unknown species appearing);
  undefined with no object;
* ``no_objects``: fraction of frames of the window with no counted object (``value: 1`` with
  ``window: 3`` = three empty frames in a row).

Firing (:class:`TriggerEngine`): a rule is *armed* at start. It fires when the window is full, the
comparison holds, it is armed and its cooldown has passed; it is then disarmed. It is re-armed
when the metric is back beyond the threshold by ``hysteresis`` (``>``/``>=``: metric <
value - hysteresis; ``<``/``<=``: metric > value + hysteresis; ``==``/``!=``: the comparison no
longer holds). So a condition that stays true fires once, not on every frame.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["TriggerRule", "PublishAction", "CommandAction", "NanonisAction", "TriggerEngine", "Firing",
           "NANONIS_ACTIONS", "frame_area_nm2", "check_unique_names", "rule_label"]

OTHER = "other"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}

#: The Nanonis TCP commands a trigger may send: action -> (command, body description).
#: ``Scan.Action``: action uint16 (0 start, 1 stop, 2 pause, 3 resume), direction uint32 (0 down, 1 up).
#: ``ZCtrl.Withdraw``: wait until finished uint32, timeout ms int32.
NANONIS_ACTIONS: dict[str, tuple[str, str]] = {
    "scan_stop": ("Scan.Action", "stop"),
    "scan_pause": ("Scan.Action", "pause"),
    "scan_resume": ("Scan.Action", "resume"),
    "withdraw": ("ZCtrl.Withdraw", "withdraw the tip"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishAction(_Strict):
    """Publish ``trigger.fired`` on the agent's PUB socket."""

    type: Literal["publish"] = "publish"


class CommandAction(_Strict):
    """Run ``argv`` (no shell) with the event JSON on stdin; killed after ``timeout_s``."""

    type: Literal["command"]
    argv: list[str] = Field(min_length=1)
    timeout_s: float = Field(30.0, gt=0, le=3600)
    cwd: str | None = None


class NanonisAction(_Strict):
    """Send one allow-listed command (:data:`NANONIS_ACTIONS`) to Nanonis on its own TCP connection.

    ``dry_run`` (the default) records what would be sent and sends nothing. ``host``/``port``
    default to the ``nanonis:`` section of the configuration.
    """

    type: Literal["nanonis"]
    action: Literal["scan_stop", "scan_pause", "scan_resume", "withdraw"]
    dry_run: bool = True
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    timeout_s: float = Field(5.0, gt=0, le=120)


Action = Annotated[Union[PublishAction, CommandAction, NanonisAction], Field(discriminator="type")]


class TriggerRule(_Strict):
    """One trigger rule (see the module docstring for the metrics and the firing logic)."""

    name: str
    metric: Literal["count", "density", "fraction", "other_fraction", "no_objects"]
    species: list[str] | None = None
    of: list[str] | None = None
    comparison: Literal[">", ">=", "<", "<=", "==", "!="] = ">="
    value: float
    window: int = Field(1, ge=1, le=10000)
    hysteresis: float = Field(0.0, ge=0)
    cooldown_s: float = Field(0.0, ge=0)
    enabled: bool = True
    actions: list[Action] = Field(default_factory=lambda: [PublishAction()])

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("a rule name is 1-64 letters, digits, _ . - (starting with a letter or digit)")
        return v

    @field_validator("species", "of", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _coherent(self) -> "TriggerRule":
        m = self.metric
        if m == "fraction" and not self.species:
            raise ValueError("metric fraction needs `species` (the numerator; `of` is the denominator)")
        if m in ("other_fraction", "no_objects") and self.species:
            raise ValueError(f"metric {m} takes no `species`")
        if self.of is not None and m != "fraction":
            raise ValueError("`of` is only used by metric fraction")
        if m in ("fraction", "other_fraction", "no_objects") and not 0 <= self.value <= 1:
            raise ValueError(f"metric {m} is a fraction: value must be within 0..1, got {self.value}")
        if not math.isfinite(self.value):
            raise ValueError("value must be a finite number")
        return self


def check_unique_names(rules: list[TriggerRule]) -> list[TriggerRule]:
    """Raise ValueError when two rules share a name (firings are recorded by rule name)."""
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ValueError(f"two rules are named {r.name!r}; rule names must be unique")
        seen.add(r.name)
    return rules


def rule_label(data: Any, loc: tuple[Any, ...]) -> str:
    """``triggers[2] (name)`` for a pydantic error location inside ``triggers`` of raw config data."""
    if len(loc) >= 2 and loc[0] == "triggers" and isinstance(loc[1], int):
        try:
            name = data["triggers"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = None
        rest = ".".join(str(p) for p in loc[2:] if not (isinstance(p, str) and p in
                                                       ("publish", "command", "nanonis")))
        head = f"triggers[{loc[1]}]" + (f" (rule {name!r})" if name else "")
        return head + (f": key {rest}" if rest else "")
    return ".".join(str(p) for p in loc)


def frame_area_nm2(scan: dict[str, Any] | None) -> float | None:
    """Acquired area of a frame, nm^2: range x * range y * completeness (None if unknown)."""
    if not scan or not scan.get("range_nm"):
        return None
    try:
        w, h = (float(v) for v in scan["range_nm"][:2])
    except (TypeError, ValueError):
        return None
    c = scan.get("completeness")
    c = 1.0 if c is None else float(c)
    a = w * h * c
    return a if a > 0 and math.isfinite(a) else None


@dataclass
class _Frame:
    frame_id: str
    name: str
    counts: dict[str, int]
    area_nm2: float | None


@dataclass
class _State:
    window: deque
    armed: bool = True
    last_fired: float | None = None
    firings: int = 0


@dataclass
class Firing:
    """A rule that fired on a frame: :attr:`event` is the ``trigger.fired`` body (without the
    envelope keys ``schema``, ``agent_id``, ``seq``); :attr:`rule` the rule."""

    rule: TriggerRule
    event: dict[str, Any] = field(default_factory=dict)


class TriggerEngine:
    """Evaluates every rule on every ok frame and says which fire.

    Parameters
    ----------
    rules : list[TriggerRule]
        Disabled rules are ignored.
    clock : callable, optional
        Monotonic seconds, for the cooldown (tests pass a fake clock).

    Notes
    -----
    Pure bookkeeping: no I/O. The daemon publishes, records and runs the actions of each
    :class:`Firing` (:meth:`observe` is cheap: O(rules x window) additions).
    """

    def __init__(self, rules: list[TriggerRule], clock: Callable[[], float] | None = None):
        import time

        self.rules = [r for r in rules if r.enabled]
        self._clock = clock or time.monotonic
        self._state = {r.name: _State(window=deque(maxlen=r.window)) for r in self.rules}

    def metric(self, rule: TriggerRule, frames: list[_Frame]) -> float:
        """The rule's metric over ``frames`` (NaN when undefined: empty denominator, unknown area)."""
        def total(names: list[str] | None) -> int:
            return sum(sum(n for s, n in f.counts.items() if names is None or s in names) for f in frames)

        if rule.metric == "count":
            return total(rule.species) / len(frames)
        if rule.metric == "density":
            areas = [f.area_nm2 for f in frames]
            if any(a is None for a in areas):
                return math.nan
            return total(rule.species) / sum(areas)  # type: ignore[arg-type]
        if rule.metric == "fraction":
            den = total(rule.of)
            return total(rule.species) / den if den else math.nan
        if rule.metric == "other_fraction":
            den = total(None)
            return total([OTHER]) / den if den else math.nan
        # no_objects
        return sum(1 for f in frames if total_one(f) == 0) / len(frames)

    def observe(self, frame: dict[str, Any]) -> list[Firing]:
        """Feed one frame result; return the rules that fire on it.

        Parameters
        ----------
        frame : dict
            ``frame_id``, ``name``, ``status`` ("ok" | "error": error frames are ignored),
            ``counts`` {species: n}, ``scan`` (with ``range_nm`` nm and ``completeness``, for
            ``density``).
        """
        if frame.get("status", "ok") != "ok":
            return []
        f = _Frame(frame_id=str(frame.get("frame_id")), name=str(frame.get("name") or ""),
                   counts={str(k): int(v) for k, v in (frame.get("counts") or {}).items()},
                   area_nm2=frame_area_nm2(frame.get("scan")))
        out = []
        now = self._clock()
        for rule in self.rules:
            st = self._state[rule.name]
            st.window.append(f)
            if len(st.window) < rule.window:
                continue
            frames = list(st.window)
            x = self.metric(rule, frames)
            if math.isnan(x):
                continue  # undefined: no decision, state unchanged
            holds = _OPS[rule.comparison](x, rule.value)
            if not st.armed:
                if self._rearmed(rule, x, holds):
                    st.armed = True
                else:
                    continue
            if not holds:
                continue
            if st.last_fired is not None and now - st.last_fired < rule.cooldown_s:
                continue
            st.armed, st.last_fired = False, now
            st.firings += 1
            out.append(Firing(rule=rule, event=self._event(rule, x, frames, st.firings)))
        return out

    @staticmethod
    def _rearmed(rule: TriggerRule, x: float, holds: bool) -> bool:
        h = rule.hysteresis
        if rule.comparison in (">", ">="):
            return x < rule.value - h if h > 0 else not holds
        if rule.comparison in ("<", "<="):
            return x > rule.value + h if h > 0 else not holds
        return not holds

    @staticmethod
    def _event(rule: TriggerRule, x: float, frames: list[_Frame], n: int) -> dict[str, Any]:
        last = frames[-1]
        return {
            "rule": rule.name,
            "metric": rule.metric,
            "species": rule.species,
            "of": rule.of,
            "comparison": rule.comparison,
            "value": rule.value,
            "observed": x,
            "window": rule.window,
            "frames": [f.frame_id for f in frames],
            "frame_id": last.frame_id,
            "name": last.name,
            "counts": dict(last.counts),
            "firing": n,
            "fired_at": datetime.now(timezone.utc).isoformat(),
            "actions": [a.model_dump(mode="json") for a in rule.actions],
        }


def total_one(f: _Frame) -> int:
    """Counted objects of one frame."""
    return sum(f.counts.values())
