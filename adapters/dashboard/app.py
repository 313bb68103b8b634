"""The dashboard's web application (FastAPI): a static page, a JSON API, server-sent events.

Routes (all JSON unless said otherwise):

* ``GET /`` the page (``static/index.html``; its script and style ship in the package: no CDN);
* ``GET /api/info``: agent id, channel, whether edits are allowed (``writable``);
* ``GET /api/frames?range=session|1h|24h|all&limit=N``: frame summaries, oldest first
  (``session`` = since the running agent started, from its heartbeat's uptime; all without one);
* ``GET /api/frames/{frame_id}``: summary + detections; ``.../image.png``: the display image;
* ``GET /api/triggers``: trigger firings with their action results; ``GET /api/health``;
* ``GET /api/references`` (gallery), ``GET /api/references/{species}/{id}.png`` (crop);
* ``POST /api/references`` ``{frame_id, x_px, y_px, species}`` and
  ``DELETE /api/references/{species}/{id}``: need ``Authorization: Bearer <dashboard.token>``;
  without a configured token the dashboard is read-only (403);
* ``GET /api/discovery`` (state of the newest discovery run: running with its stage, or its
  clusters), ``GET /api/discovery/folders`` (folders inside the acquisition roots that hold scans),
  ``GET /api/discovery/runs/{run}/{name}.png`` (cluster, medoid crop, contact sheet);
  ``POST /api/discovery`` ``{source: frames|folder, range, folder}``, ``POST /api/discovery/cancel``
  and ``POST /api/discovery/adopt`` ``{run, cluster, species, medoids}``: need the token;
* ``GET /api/events``: server-sent events ``frame``, ``health``, ``trigger``, ``references``,
  ``discovery``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from stm_agent.adapters.dashboard.data import DashboardData, DataError
from stm_agent.adapters.dashboard.discovery import DiscoveryJobs
from stm_agent.adapters.dashboard.live import LiveHub
from stm_agent.agent.config import AgentConfig

__all__ = ["create_app", "dashboard_token"]

TOKEN_ENV = "STM_AGENT_DASHBOARD_TOKEN"


def dashboard_token(cfg: AgentConfig) -> str | None:
    """The edit token: ``$STM_AGENT_DASHBOARD_TOKEN`` or ``dashboard.token`` (None = read-only)."""
    return os.environ.get(TOKEN_ENV) or cfg.dashboard.token or None


class NewReference(BaseModel):
    """Body of ``POST /api/references``: the object at (x_px, y_px) of a recorded frame."""

    frame_id: str = Field(min_length=8, max_length=64)
    x_px: float
    y_px: float
    species: str = Field(min_length=1, max_length=64)


class DiscoveryRequest(BaseModel):
    """Body of ``POST /api/discovery``: the frames of a history range, or a folder of scans."""

    source: Literal["frames", "folder"] = "frames"
    range: Literal["session", "1h", "24h", "all"] = "all"
    folder: str | None = Field(None, max_length=4096)


class Adoption(BaseModel):
    """Body of ``POST /api/discovery/adopt``: cluster ``cluster`` of run ``run`` becomes ``species``."""

    run: str = Field(min_length=15, max_length=24)
    cluster: int = Field(ge=0)
    species: str = Field(min_length=1, max_length=64)
    medoids: int = Field(3, ge=1, le=5)


def create_app(cfg: AgentConfig, endpoint: str | None = None, token: str | None = None) -> FastAPI:
    """Build the dashboard application for the agent configured by ``cfg``.

    Parameters
    ----------
    cfg : AgentConfig
        Where the store, display images and references are; ``dashboard.history_frames``.
    endpoint : str | None
        The agent's PUB endpoint for the live feed (default ``cfg.publish.endpoint``; ``""`` = none).
    token : str | None
        Edit token; default :func:`dashboard_token`.
    """
    data = DashboardData(cfg)
    hub = LiveHub(cfg.publish.endpoint if endpoint is None else (endpoint or None), data)
    jobs = DiscoveryJobs(cfg, data, lambda state: hub._broadcast("discovery", state))
    secret = token if token is not None else dashboard_token(cfg)
    static = resources.files("stm_agent.adapters.dashboard").joinpath("static")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            jobs.stop()
            hub.stop()

    app = FastAPI(title="stm-agent dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.hub, app.state.data, app.state.discovery = hub, data, jobs

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    def may_edit(authorization: str | None = Header(None)) -> None:
        if not secret:
            raise HTTPException(403, "read-only dashboard: set dashboard.token (or $%s) to edit references" % TOKEN_ENV)
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), secret.encode()):
            raise HTTPException(401, "wrong or missing token")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(static.joinpath("index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {"agent_id": cfg.agent_id, "writable": bool(secret), "channel": cfg.channel,
                "direction": cfg.direction, "store": str(cfg.results.store),
                "references": str(cfg.references.folder), "live": hub.endpoint,
                "history_frames": cfg.dashboard.history_frames, "keep_images": cfg.dashboard.keep_images}

    @app.get("/api/frames")
    def frames(range: str = "session", limit: int | None = None) -> dict[str, Any]:  # noqa: A002
        hb = hub.heartbeat if hub.heartbeat_at is not None else None
        since = data.since(range, hb.get("uptime_s") if hb else None)
        n = min(int(limit or cfg.dashboard.history_frames), 100_000)
        return {"range": range, "since": since, "frames": data.frames(since, n)}

    @app.get("/api/frames/{frame_id}")
    def frame(frame_id: str) -> dict[str, Any]:
        return data.frame(frame_id)

    @app.get("/api/frames/{frame_id}/image.png")
    def image(frame_id: str) -> FileResponse:
        return FileResponse(data.image_path(frame_id), media_type="image/png",
                            headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/triggers")
    def triggers(limit: int = 200) -> dict[str, Any]:
        return {"firings": data.firings(limit=min(limit, 10_000)),
                "rules": [r.model_dump(mode="json") for r in cfg.triggers]}

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return hub.health()

    @app.get("/api/references")
    def references() -> dict[str, Any]:
        return {"references": data.references(), "writable": bool(secret)}

    @app.get("/api/references/{species}/{ref_id}.png")
    def reference_png(species: str, ref_id: str) -> Response:
        return Response(data.reference_png(species, ref_id), media_type="image/png")

    @app.post("/api/references", dependencies=[Depends(may_edit)])
    def add_reference(body: NewReference) -> dict[str, Any]:
        out = data.add_reference(data.resolve(body.frame_id), body.x_px, body.y_px, body.species)
        hub._broadcast("references", {"added": out})
        return out

    @app.delete("/api/references/{species}/{ref_id}", dependencies=[Depends(may_edit)])
    def remove_reference(species: str, ref_id: str) -> dict[str, Any]:
        data.remove_reference(species, ref_id)
        hub._broadcast("references", {"removed": {"species": species, "id": ref_id}})
        return {"removed": {"species": species, "id": ref_id}}

    @app.get("/api/discovery")
    def discovery_state() -> dict[str, Any]:
        return jobs.public()

    @app.get("/api/discovery/folders")
    def discovery_folders() -> dict[str, Any]:
        return {"folders": jobs.folders(), "roots": list(jobs.acq.folders)}

    @app.get("/api/discovery/runs/{run}/{name}")
    def discovery_image(run: str, name: str) -> FileResponse:
        return FileResponse(jobs.image(run, name), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/discovery", status_code=202, dependencies=[Depends(may_edit)])
    def discovery_start(body: DiscoveryRequest) -> dict[str, Any]:
        hb = hub.heartbeat if hub.heartbeat_at is not None else None
        return jobs.start(body.source, body.range, body.folder, hb.get("uptime_s") if hb else None)

    @app.post("/api/discovery/cancel", dependencies=[Depends(may_edit)])
    def discovery_cancel() -> dict[str, Any]:
        return jobs.cancel()

    @app.post("/api/discovery/adopt", dependencies=[Depends(may_edit)])
    def discovery_adopt(body: Adoption) -> dict[str, Any]:
        out = jobs.adopt(body.run, body.cluster, body.species, body.medoids)
        hub._broadcast("references", {"adopted": out})
        return out

    @app.get("/api/events")
    async def events(request: Request) -> EventSourceResponse:
        q = hub.subscribe()

        async def stream():
            try:
                yield {"event": "health", "data": json.dumps(hub.health())}
                while True:
                    event, payload = await q.get()
                    if event == "_close":
                        return
                    yield {"event": event, "data": json.dumps(payload, default=str)}
            finally:
                hub.unsubscribe(q)

        return EventSourceResponse(stream(), ping=15)

    return app
