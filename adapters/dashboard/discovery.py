"""Species discovery from the dashboard: run :func:`agent.discovery_run.run_discovery` on the
frames the agent has seen (or on a folder inside the acquisition roots) and adopt a cluster as a
species (:func:`agent.discovery_run.adopt_cluster`, the code path of ``refs add --from-cluster``).

A run takes seconds to minutes, so it never runs on a request thread, nor in the agent's process:
one run at a time, in a spawned process at lower CPU priority (``nice`` + 10), so the live view
and the agent's own frames keep their pace. Its progress comes back through a queue; a monitor
thread keeps :attr:`DiscoveryJobs.state` and hands every change to ``notify`` (the page's
``discovery`` server-sent event). Runs are written under ``discovery/<run>/`` next to the store
(the newest :data:`KEEP_RUNS` are kept); a dashboard started later shows the newest finished one.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from stm_agent.adapters.dashboard.data import DashboardData, DataError
from stm_agent.adapters.files import Roots
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.errors import StmAgentError

__all__ = ["DiscoveryJobs", "KEEP_RUNS", "MAX_FRAMES"]

log = logging.getLogger(__name__)

#: Finished runs kept under ``discovery/`` (older ones are deleted when a run finishes).
KEEP_RUNS = 5
#: Newest frames of the chosen history range (or newest scans of a folder) a run takes.
MAX_FRAMES = 500
_COUNT_CAP = 2000
_RUN_RE = re.compile(r"^\d{8}T\d{6}(-\d{1,3})?$")
_FILE_RE = re.compile(r"^(cluster_(\d+|noise)|medoid_\d+_\d+|contact_sheet)\.png$")


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _work(paths: list[str], cfg: AgentConfig, out: str, q: Any, roots: Roots | None) -> None:
    """The spawned process: one discovery run, progress and the outcome put on ``q``."""
    try:
        os.nice(10)
    except OSError:
        pass
    from stm_agent.agent.discovery_run import run_discovery

    last = [None]

    def progress(stage: str, done: int, total: int) -> None:
        if (stage, done) != last[0]:
            last[0] = (stage, done)
            q.put(("progress", {"stage": stage, "done": done, "total": total}))

    try:
        d = run_discovery(paths, cfg, out, roots=roots, progress=progress)
        q.put(("done", {"k": d["k"], "n_objects": d["n_objects"]}))
    except StmAgentError as e:
        q.put(("failed", {"error": str(e)}))
    except OSError as e:
        q.put(("failed", {"error": f"{out}: cannot write the gallery ({e.strerror or e})"}))
    except Exception as e:  # noqa: BLE001 - the page gets the reason, the agent is untouched
        q.put(("failed", {"error": f"{type(e).__name__}: {e}"}))


class DiscoveryJobs:
    """Discovery runs of one dashboard.

    Parameters
    ----------
    cfg : AgentConfig
        The agent's configuration: its store (runs go next to it), acquisition roots, references,
        segmentation and channel.
    data : DashboardData
        The store's frames (the default input).
    notify : callable(dict)
        Called with :meth:`public` after every change of state (from any thread).
    """

    def __init__(self, cfg: AgentConfig, data: DashboardData, notify: Callable[[dict[str, Any]], None]):
        self.cfg, self.data, self.notify = cfg, data, notify
        self.root = Path(cfg.results.store).parent / "discovery"
        self.acq = Roots([cfg.acquisition.folder, *cfg.acquisition.roots], "acquisition roots")
        self._lock = threading.Lock()
        self._proc: Any = None
        self._cancelled = False
        self.state: dict[str, Any] = self._latest() or {"state": "idle"}

    # ------------------------------------------------------------------ inputs
    def folders(self, limit: int = 200) -> list[dict[str, Any]]:
        """The acquisition roots and their sub-folders (two levels) that hold ``.sxm`` scans, with
        the number of scans under each (searched recursively, as a run reads them; counting stops
        at 2000, ``more`` = True)."""
        out = []
        for root in self.acq.folders:
            base = Path(root)
            if not base.is_dir():
                continue
            cands = [base] + sorted(p for p in base.glob("*/") if p.is_dir()) + sorted(p for p in base.glob("*/*/") if p.is_dir())
            for p in cands:
                n = sum(1 for _ in itertools.islice((f for f in p.rglob("*.sxm") if f.is_file()), _COUNT_CAP))
                if n:
                    out.append({"folder": str(p), "scans": n, "more": n == _COUNT_CAP, "root": root})
                if len(out) >= limit:
                    return out
        return out

    # ------------------------------------------------------------------ runs
    def start(self, source: str = "frames", range_: str = "all", folder: str | None = None,
              uptime_s: float | None = None) -> dict[str, Any]:
        """Start a run on the recorded frames of a history range (``source="frames"``) or on the
        scans under ``folder`` (inside the acquisition roots).

        Raises
        ------
        DataError
            A run is already going (409); folder outside the acquisition roots or missing (422);
            no scan to read (422); the store's folder cannot be written (409).
        """
        with self._lock:
            if self.state.get("state") == "running":
                raise DataError("a discovery run is already running: wait for it or cancel it", 409)
            roots = None
            if source == "frames":
                paths = self.data.scan_paths(self.data.since(range_, uptime_s), MAX_FRAMES)
                what = {"source": "frames", "range": range_}
                if not paths:
                    raise DataError("no recorded frame whose scan can be read again in this range: "
                                    "choose 'all frames' or a folder", 422)
            elif source == "folder":
                if not folder:
                    raise DataError("choose a folder inside the acquisition roots", 422)
                f = Path(folder)
                if not f.is_absolute():
                    f = Path(self.cfg.acquisition.folder) / f
                try:
                    real = self.acq.resolve(f)
                except StmAgentError as e:
                    raise DataError(str(e), 422) from None
                if not Path(real).is_dir():
                    raise DataError(f"{folder}: no such folder", 422)
                from stm_agent.agent.discovery_run import scan_paths

                found = scan_paths([real])
                # the newest MAX_FRAMES (a run holds every crop in memory)
                paths = [str(p) for p in sorted(found, key=_mtime)[-MAX_FRAMES:]]
                roots = self.acq
                what = {"source": "folder", "folder": str(f), "n_found": len(found)}
                if not paths:
                    raise DataError(f"{folder}: no .sxm scan in this folder", 422)
            else:
                raise DataError(f"source {source!r}: 'frames' or 'folder'", 422)
            run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            out = self.root / run
            for i in range(1, 1000):
                if not out.exists():
                    break
                out = self.root / f"{run}-{i}"
            try:
                out.mkdir(parents=True)
            except OSError as e:
                raise DataError(f"{out}: cannot write the discovery results ({e.strerror or e})", 409) from None
            ctx = mp.get_context("spawn")  # a clean process: no inherited threads, sockets or sessions
            q = ctx.Queue()
            proc = ctx.Process(target=_work, args=(paths, self.cfg, str(out), q, roots), daemon=True,
                               name="stm-agent-discovery")
            self._cancelled = False
            self.state = {"state": "running", "run": out.name, **what, "n_scans": len(paths), "stage": "starting",
                          "done": 0, "total": len(paths), "started": _now()}
            proc.start()
            self._proc = proc
        threading.Thread(target=self._monitor, args=(proc, q, out), daemon=True, name="discovery-monitor").start()
        self.notify(self.public())
        return self.public()

    def cancel(self) -> dict[str, Any]:
        """Stop the running run (its folder is removed).

        Raises
        ------
        DataError
            (409) nothing is running.
        """
        with self._lock:
            if self.state.get("state") != "running" or self._proc is None:
                raise DataError("no discovery run is running", 409)
            self._cancelled = True
            self._proc.terminate()
        return self.public()

    def _monitor(self, proc: Any, q: Any, out: Path) -> None:
        final = None
        while final is None:
            try:
                kind, payload = q.get(timeout=0.5)
            except queue.Empty:
                if not proc.is_alive():
                    try:  # its last message may still be in the pipe
                        kind, payload = q.get(timeout=0.5)
                    except queue.Empty:
                        final = ("cancelled", {}) if self._cancelled else \
                            ("failed", {"error": f"the discovery process ended unexpectedly (exit code {proc.exitcode})"})
                        break
                else:
                    continue
            if kind == "progress":
                with self._lock:
                    self.state.update(payload)
                self.notify(self.public())
            else:
                final = (kind, payload)
        proc.join(5)
        kind, payload = final
        with self._lock:
            self._proc = None
            if kind == "done":
                self.state = {**self.state, "state": "done", "stage": "done", "finished": _now()}
                self.state["result"] = self._result(out)
            else:
                self.state = {**self.state, "state": kind, "finished": _now(), **payload}
                shutil.rmtree(out, ignore_errors=True)
                if kind == "failed":
                    log.warning("dashboard discovery run %s failed: %s", out.name, payload.get("error"))
        if kind == "done":
            self._prune()
        self.notify(self.public())

    def _prune(self) -> None:
        runs = sorted((p for p in self.root.iterdir() if p.is_dir() and _RUN_RE.match(p.name)), key=lambda p: p.name)
        for p in runs[:-KEEP_RUNS]:
            shutil.rmtree(p, ignore_errors=True)

    def _latest(self) -> dict[str, Any] | None:
        if not self.root.is_dir():
            return None
        runs = sorted((p for p in self.root.iterdir() if (p / "discovery.json").is_file() and _RUN_RE.match(p.name)),
                      key=lambda p: p.name)
        if not runs:
            return None
        try:
            return {"state": "done", "run": runs[-1].name, "stage": "done", "result": self._result(runs[-1])}
        except StmAgentError:
            return None

    def _result(self, out: Path) -> dict[str, Any]:
        from stm_agent.adapters.gallery import read_discovery

        d = read_discovery(out)
        run = out.name
        clusters = []
        for c in d["clusters"]:
            clusters.append({
                **{k: c[k] for k in ("cluster", "n", "area_nm2", "extent_nm", "height", "depressions")},
                "image": f"/api/discovery/runs/{run}/{c.get('png') or ''}",
                "medoids": [{"image": f"/api/discovery/runs/{run}/{m['png']}", "scan": Path(m["scan"]).name,
                             "x_px": m["x_px"], "y_px": m["y_px"]} for m in c["medoids"] if m.get("png")],
            })
        skipped = d.get("skipped") or []
        return {"run": run, "k": d["k"], "silhouette": d.get("silhouette"), "n_objects": d["n_objects"],
                "n_scans": len(d.get("scans") or []), "embedding": d.get("embedding"), "method": d.get("method"),
                "height_unit": d.get("height_unit"), "window_nm": d.get("window_nm"),
                "skipped": skipped[:20], "n_skipped": len(skipped), "clusters": clusters,
                "contact_sheet": f"/api/discovery/runs/{run}/contact_sheet.png"}

    def public(self) -> dict[str, Any]:
        """The state as the page sees it: ``state`` (idle, running, done, failed, cancelled), the
        run, its input, ``stage`` / ``done`` / ``total`` while running, ``error``, and ``result``
        (clusters with their medoid crops' URLs) once done."""
        with self._lock:
            return dict(self.state)

    def run_folder(self, run: str) -> Path:
        """The folder of a finished run.

        Raises
        ------
        DataError
            (404) bad or unknown run id.
        """
        if not _RUN_RE.match(run) or not (self.root / run / "discovery.json").is_file():
            raise DataError(f"no discovery run {run}", 404)
        return self.root / run

    def image(self, run: str, name: str) -> Path:
        """A gallery PNG of a finished run (cluster, medoid crop, contact sheet).

        Raises
        ------
        DataError
            (404) bad name or no such file.
        """
        p = self.run_folder(run) / name
        if not _FILE_RE.match(name) or not p.is_file():
            raise DataError(f"no image {name} in discovery run {run}", 404)
        return p

    def adopt(self, run: str, cluster: int, species: str, n: int = 3) -> dict[str, Any]:
        """Adopt the ``n`` medoids of ``cluster`` as references of ``species``
        (:func:`agent.discovery_run.adopt_cluster`).

        Raises
        ------
        DataError
            Unknown run (404); no such cluster, a bad species name, a scan that cannot be read again (422).
        """
        from stm_agent.agent.discovery_run import adopt_cluster

        folder = self.run_folder(run)
        try:
            paths = adopt_cluster(species, int(cluster), folder, self.cfg, n=n)
        except StmAgentError as e:
            raise DataError(str(e), 422) from None
        return {"species": species, "run": run, "cluster": int(cluster), "ids": [p.stem for p in paths]}

    def stop(self) -> None:
        """Terminate a running run (the dashboard stops)."""
        with self._lock:
            proc = self._proc
            self._cancelled = True
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(3)
