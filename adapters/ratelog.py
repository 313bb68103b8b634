"""Rate-limited logging: a message repeated many times a second is logged once per interval.

A peer that sends malformed messages in a loop, or a full disk the worker retries every second,
must not flood the log (issue 15, finding 14: 240 B per malformed message, ~30 ERROR lines/s on a
full disk). :class:`RateLimitedLog` logs the first occurrence of each key at once, then at most one
line per ``interval_s`` for that key, saying how many were suppressed in between.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RateLimitedLog", "MAX_LOGGED_CHARS", "clip"]

#: Longest text (characters) a peer-supplied value may put into one log line.
MAX_LOGGED_CHARS = 300


def clip(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters (with the number cut), for logging untrusted text."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s) - limit} more characters)"


class RateLimitedLog:
    """Log through ``logger`` at most once per ``interval_s`` per key (thread-safe).

    Parameters
    ----------
    logger : logging.Logger
    interval_s : float
        Shortest time between two lines of the same key, s.
    max_keys : int
        Keys remembered (the oldest are forgotten beyond it, so untrusted keys cannot grow memory).

    Examples
    --------
    >>> rl = RateLimitedLog(logging.getLogger("x"), 10.0)
    >>> rl.log(logging.WARNING, "malformed:header_json", "malformed message: %s", "...")
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 256):
        self.logger = logger
        self.interval_s = float(interval_s)
        self.max_keys = int(max_keys)
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time logged, suppressed since)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago; True if logged.

        The line says how many messages of that key were suppressed since the last one.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return False
            suppressed = last[1] if last is not None else 0
            self._last.pop(key, None)
            self._last[key] = (now, 0)
            while len(self._last) > self.max_keys:
                self._last.pop(next(iter(self._last)))
        if suppressed:
            msg = f"{msg} ({suppressed} more like it in the last {self.interval_s:g} s not logged)"
        self.logger.log(level, msg, *args)
        return True

    def reset(self, key: str) -> None:
        """Forget ``key`` (e.g. the condition cleared), so the next occurrence is logged at once."""
        with self._lock:
            self._last.pop(key, None)
