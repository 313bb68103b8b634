"""What the agent does around each frame besides recording and publishing it.

:class:`AgentHooks` keeps these out of the daemon's main path (:mod:`agent.daemon` calls four
methods):

* :meth:`~AgentHooks.before_publish` writes the frame's *display image* (the flattened frame as an
  8-bit PNG, unacquired rows transparent) into ``<store folder>/display/<frame_id>.png`` for the
  dashboard, keeping the newest ``dashboard.keep_images``;
* :meth:`~AgentHooks.after_publish` evaluates the trigger rules (:mod:`agent.triggers`): each
  firing is recorded in the store, published as ``trigger.fired`` (when the rule has a publish
  action) and its command / Nanonis actions are handed to :class:`adapters.actions.ActionRunner`
  (never run on the worker thread); it also emits the frame's Bluesky event when enabled;
* :meth:`~AgentHooks.poll` (between frames) reloads the reference library when its folder changed
  (``stm-agent refs add``, the dashboard): the recogniser is rebuilt with
  :meth:`agent.pipeline.Recognizer.from_config`, so "the next frame" is the first one processed
  after the rebuild;
* :meth:`~AgentHooks.start` / :meth:`~AgentHooks.close`: the dashboard server
  (``dashboard.enabled``), the Bluesky run, the action pool.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stm_agent.adapters.outputs import display_dir
from stm_agent.agent.domain import FrameResult
from stm_agent.agent.errors import StmAgentError
from stm_agent.agent.triggers import PublishAction, TriggerEngine

if TYPE_CHECKING:  # pragma: no cover
    from stm_agent.agent.daemon import Agent

__all__ = ["AgentHooks", "library_signature", "display_dir", "display_png"]

log = logging.getLogger(__name__)

_RELOAD_CHECK_S = 0.5  # how often the library folder is looked at
_RELOAD_SETTLE_S = 0.3  # a change must be stable this long (a reference is 3 files written in turn)


def library_signature(folder: str | Path) -> tuple:
    """(name, size, mtime_ns) of every reference file (``<species>/*.npy|json``), sorted; () if none."""
    root = Path(folder)
    out = []
    try:
        for sub in os.scandir(root):
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            for f in os.scandir(sub.path):
                if f.name.endswith((".npy", ".json")):
                    st = f.stat()
                    out.append((f"{sub.name}/{f.name}", st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(out))


def display_png(image: np.ndarray) -> bytes:
    """PNG bytes (8-bit grey + alpha) of a flattened frame.

    Parameters
    ----------
    image : np.ndarray
        float ``(ny, nx)``, row 0 = top; NaN = not acquired.

    Returns
    -------
    bytes
        Grey = 1..99 % percentile stretch of the acquired pixels; alpha 0 where not acquired, so the
        page shows unacquired rows as such (hatched), not as black data.
    """
    import cv2

    finite = np.isfinite(image)
    grey = np.zeros(image.shape, np.uint8)
    if finite.any():
        lo, hi = np.percentile(image[finite], [1, 99])
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey[finite] = np.clip((image[finite] - lo) * scale, 0, 255).astype(np.uint8)
    alpha = np.where(finite, 255, 0).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.dstack([grey, grey, grey, alpha]))
    if not ok:
        raise OSError("cannot encode the display image")
    return buf.tobytes()


class AgentHooks:
    """Triggers, display images, library reload, dashboard and Bluesky for one :class:`Agent`."""

    def __init__(self, agent: "Agent", own_recognizer: bool):
        self.agent = agent
        cfg = agent.cfg
        self.cfg = cfg
        self.engine = TriggerEngine(cfg.triggers) if cfg.triggers else None
        self.runner = None
        if self.engine is not None and any(a.type != "publish" for r in cfg.triggers for a in r.actions):
            from stm_agent.adapters.actions import ActionRunner

            self.runner = ActionRunner(cfg.nanonis.host, cfg.nanonis.port, self._action_done)
        self.display = display_dir(agent.store.path) if agent.store.path is not None else None
        self.keep_images = cfg.dashboard.keep_images
        self.own_recognizer = own_recognizer
        self._lib_sig = library_signature(cfg.references.folder) if own_recognizer else ()
        self._lib_pending: tuple | None = None
        self._lib_pending_at = 0.0
        self._next_check = 0.0
        self.reloads = 0
        self.dashboard = None
        self.bluesky = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the dashboard server and the Bluesky run when the configuration asks for them."""
        cfg = self.cfg
        if cfg.bluesky.enabled:
            from stm_agent.adapters.bluesky import BlueskyRecorder

            folder = cfg.bluesky.folder or (self.agent.store.path.parent / "bluesky" if self.agent.store.path
                                            else Path("bluesky"))
            self.bluesky = BlueskyRecorder.to_jsonl(folder, agent_id=cfg.agent_id,
                                                    config_digest=self.agent.config_digest)
        if cfg.dashboard.enabled:
            from stm_agent.adapters.dashboard.server import DashboardServer

            server = DashboardServer(cfg, endpoint=self.agent.endpoint)
            server.start()
            self.dashboard = server
            log.info("dashboard on %s", server.url)

    def close(self) -> None:
        """Stop the dashboard, close the Bluesky run, let running actions finish (bounded by their timeouts)."""
        for what, fn in (("dashboard", lambda: self.dashboard and self.dashboard.stop()),
                         ("bluesky", lambda: self.bluesky and self.bluesky.close()),
                         ("actions", lambda: self.runner and self.runner.close(wait=True))):
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("cannot stop the %s cleanly", what)

    # ------------------------------------------------------------------ per frame
    def before_publish(self, result: FrameResult) -> None:
        """Write the display image of an ok frame (before it is announced, so a page can fetch it)."""
        if self.display is None or self.keep_images <= 0 or result.image is None:
            return
        try:
            self.display.mkdir(parents=True, exist_ok=True)
            p = self.display / f"{result.frame_id}.png"
            tmp = p.with_suffix(".png.tmp")
            tmp.write_bytes(display_png(result.image))
            tmp.replace(p)
            self._prune()
        except OSError as exc:
            log.warning("cannot write the display image of %s: %s", result.frame_id[:12], exc)

    def _prune(self) -> None:
        files = [e for e in os.scandir(self.display) if e.name.endswith(".png")]
        if len(files) <= self.keep_images:
            return
        files.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in files[: len(files) - self.keep_images]:
            try:
                os.unlink(e.path)
            except OSError:
                pass

    def after_publish(self, msg: dict[str, Any], result: FrameResult | None) -> None:
        """Evaluate the trigger rules on a frame and feed the Bluesky run (ok frames)."""
        if self.bluesky is not None and msg.get("status") == "ok":
            try:
                self.bluesky.frame(msg, result.scan if result is not None else None)
            except Exception:  # noqa: BLE001 - an optional output never stops the agent
                log.exception("bluesky: cannot emit the event of %s", msg.get("name"))
        if self.engine is None:
            return
        frame = {**msg, "scan": result.scan if result is not None else msg.get("scan")}
        for firing in self.engine.observe(frame):
            ev = firing.event
            log.warning("trigger %s fired on %s: %s %s %s (observed %.4g over %d frame(s))", ev["rule"], ev["name"],
                        ev["metric"], ev["comparison"], ev["value"], ev["observed"], ev["window"])
            key = None
            try:
                key = self.agent.store.record_firing(ev)
            except StmAgentError as exc:
                log.error("trigger %s: cannot record the firing: %s", ev["rule"], exc)
            if any(isinstance(a, PublishAction) for a in firing.rule.actions):
                self.agent._publish("trigger.fired", dict(ev))
            if self.runner is not None:
                self.runner.submit(key, ev, firing.rule.actions)

    def _action_done(self, key: Any, index: int, result: dict[str, Any]) -> None:
        if key is not None:
            self.agent.store.set_action_result(key, index, result)

    # ------------------------------------------------------------------ between frames
    def poll(self) -> bool:
        """Rebuild the recogniser if the reference library changed; True when it was rebuilt."""
        if not self.own_recognizer:
            return False
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + _RELOAD_CHECK_S
        sig = library_signature(self.cfg.references.folder)
        if sig == self._lib_sig:
            self._lib_pending = None
            return False
        if sig != self._lib_pending:  # wait until the folder is stable (files written one by one)
            self._lib_pending, self._lib_pending_at = sig, now
            self._next_check = now + _RELOAD_SETTLE_S
            return False
        if now - self._lib_pending_at < _RELOAD_SETTLE_S:
            return False
        return self.reload(sig)

    def reload(self, sig: tuple | None = None) -> bool:
        """Rebuild the recogniser from ``references.folder`` now (pose embeddings cached on disk)."""
        from stm_agent.agent.pipeline import Recognizer

        t0 = time.perf_counter()
        try:
            rec = Recognizer.from_config(self.cfg, allow_empty=True)
        except StmAgentError as exc:
            log.error("reference library changed but cannot be loaded (keeping the previous one): %s", exc)
            self._lib_sig = sig if sig is not None else library_signature(self.cfg.references.folder)
            return False
        self.agent.recognizer = rec
        self._lib_sig = sig if sig is not None else library_signature(self.cfg.references.folder)
        self._lib_pending = None
        self.reloads += 1
        log.info("reference library reloaded: species %s (%.0f ms)",
                 list(getattr(rec.refs, "species", [])), (time.perf_counter() - t0) * 1000.0)
        return True
