"""The actions of a trigger that touch the outside world: a command, a Nanonis TCP command.

:class:`ActionRunner` runs them on a small thread pool, so the worker that processes frames never
waits for them; every result (exit status, output tail, what was sent to Nanonis or would have
been sent in a dry run) goes to the ``on_result`` callback (the daemon records it in the store).

* **Command**: ``argv`` run without a shell, the ``trigger.fired`` event as JSON on stdin, killed
  after ``timeout_s`` (the result then says ``timed_out: true``).
* **Nanonis**: one allow-listed command (:data:`agent.triggers.NANONIS_ACTIONS`) on its own TCP
  connection (never the one the Nanonis source keeps blocked in ``Scan.WaitEndOfScan``), opened
  for this command and closed after the reply. ``dry_run: true`` (the default) connects to
  nothing: the result records what would have been sent.
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from stm_agent.agent.triggers import NANONIS_ACTIONS, CommandAction, NanonisAction

__all__ = ["ActionRunner", "run_command", "nanonis_action", "nanonis_request_body"]

log = logging.getLogger(__name__)

_TAIL = 2000  # characters of stdout/stderr kept in the record
_SCAN_ACTION = {"scan_stop": 1, "scan_pause": 2, "scan_resume": 3}


def run_command(action: CommandAction, event: dict[str, Any]) -> dict[str, Any]:
    """Run ``action.argv`` with ``event`` as JSON on stdin; wait at most ``action.timeout_s``.

    Returns
    -------
    dict
        ``type``, ``argv``, ``exit_status`` (int, None when it could not start or timed out),
        ``timed_out``, ``stdout`` / ``stderr`` (last 2000 characters), ``error`` (why it could
        not run, else None), ``duration_ms``.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"type": "command", "argv": list(action.argv), "exit_status": None, "timed_out": False,
                           "stdout": "", "stderr": "", "error": None}
    try:
        p = subprocess.run(action.argv, input=json.dumps(event).encode(), capture_output=True,
                           timeout=action.timeout_s, cwd=action.cwd, check=False)
        out["exit_status"] = p.returncode
        out["stdout"] = p.stdout.decode("utf-8", "replace")[-_TAIL:]
        out["stderr"] = p.stderr.decode("utf-8", "replace")[-_TAIL:]
    except subprocess.TimeoutExpired as exc:
        out["timed_out"] = True
        out["error"] = f"killed after {action.timeout_s:g} s"
        out["stdout"] = (exc.stdout or b"").decode("utf-8", "replace")[-_TAIL:]
    except OSError as exc:
        out["error"] = f"cannot run {action.argv[0]!r}: {exc.strerror or exc}"
    out["duration_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
    return out


def nanonis_request_body(action: str) -> tuple[str, bytes]:
    """The Nanonis command name and request body of an allow-listed ``action``.

    ``Scan.Action``: action uint16 BE (1 stop, 2 pause, 3 resume), direction uint32 BE (0 = keep
    the configured one, ignored for these actions). ``ZCtrl.Withdraw``: wait until finished uint32
    BE (1), timeout ms int32 BE (5000).

    Raises
    ------
    KeyError
        ``action`` is not in the allow-list.
    """
    command = NANONIS_ACTIONS[action][0]
    if command == "Scan.Action":
        return command, struct.pack(">HI", _SCAN_ACTION[action], 0)
    return command, struct.pack(">Ii", 1, 5000)


def _parse_error_section(body: bytes) -> tuple[int, str]:
    if len(body) < 8:
        return 0, ""
    status, n = struct.unpack_from(">Ii", body, 0)
    return int(status), body[8:8 + max(n, 0)].decode("utf-8", "replace").strip("\0").strip()


def nanonis_action(action: NanonisAction, host: str, port: int) -> dict[str, Any]:
    """Send ``action`` to Nanonis at ``host:port`` on a new TCP connection (unless ``dry_run``).

    Returns
    -------
    dict
        ``type``, ``action``, ``command`` (Nanonis name), ``address``, ``dry_run``, ``sent``
        (bool), ``error_status`` / ``error`` (Nanonis' reply, or why it could not be sent),
        ``duration_ms``.
    """
    from stm_agent.adapters.nanonis_tcp import NanonisClient
    from stm_agent.agent.errors import StmAgentError

    t0 = time.perf_counter()
    host, port = action.host or host, action.port or port
    command, body = nanonis_request_body(action.action)
    out: dict[str, Any] = {"type": "nanonis", "action": action.action, "command": command,
                           "address": f"{host}:{port}", "dry_run": action.dry_run, "sent": False,
                           "error_status": None, "error": None}
    if action.dry_run:
        out["error"] = None
        log.info("trigger action (dry run): would send %s (%s) to Nanonis at %s:%s", command, action.action, host, port)
    else:
        client = None
        try:
            client = NanonisClient(host, port, connect_timeout_s=min(action.timeout_s, 5.0))
            reply = client.request(command, body, action.timeout_s)
            out["sent"] = True
            out["error_status"], out["error"] = _parse_error_section(reply)
            out["error"] = out["error"] or None
        except (OSError, StmAgentError) as exc:
            out["error"] = f"cannot send {command} to {host}:{port}: {exc}"
        finally:
            if client is not None:
                client.close()
    out["duration_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
    return out


class ActionRunner:
    """Runs command and Nanonis actions off the worker thread.

    Parameters
    ----------
    nanonis_host, nanonis_port : str, int
        Default Nanonis address (the ``nanonis:`` section).
    on_result : callable(key, index, result)
        Called from a pool thread with the firing's ``key`` (the store id), the action's index in
        the rule's ``actions`` and the result dict. Exceptions it raises are logged.
    max_workers : int
        Actions running at once; more wait in the pool's queue.
    """

    def __init__(self, nanonis_host: str, nanonis_port: int,
                 on_result: Callable[[Any, int, dict[str, Any]], None], max_workers: int = 2):
        self.nanonis_host, self.nanonis_port = nanonis_host, nanonis_port
        self.on_result = on_result
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trigger-action")

    def submit(self, key: Any, event: dict[str, Any], actions: list[Any]) -> int:
        """Queue every command / Nanonis action of a firing; returns how many were queued (never blocks)."""
        n = 0
        for i, a in enumerate(actions):
            if isinstance(a, (CommandAction, NanonisAction)):
                self._pool.submit(self._run, key, i, a, event)
                n += 1
        return n

    def _run(self, key: Any, index: int, action: Any, event: dict[str, Any]) -> None:
        try:
            if isinstance(action, CommandAction):
                res = run_command(action, event)
            else:
                res = nanonis_action(action, self.nanonis_host, self.nanonis_port)
        except Exception as exc:  # noqa: BLE001 - an action never kills the agent
            log.exception("trigger %s: action %d failed", event.get("rule"), index)
            res = {"type": getattr(action, "type", "?"), "error": f"internal error: {exc}"}
        level = logging.WARNING if res.get("error") or res.get("exit_status") not in (None, 0) else logging.INFO
        log.log(level, "trigger %s: action %d (%s) done: %s", event.get("rule"), index, res.get("type"),
                {k: v for k, v in res.items() if k not in ("stdout", "stderr")})
        try:
            self.on_result(key, index, res)
        except Exception:  # noqa: BLE001
            log.exception("trigger %s: cannot record the result of action %d", event.get("rule"), index)

    def close(self, wait: bool = True) -> None:
        """Stop taking actions; with ``wait``, let running ones finish (each is bounded by its timeout)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
