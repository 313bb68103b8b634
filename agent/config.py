"""Configuration: pydantic models validated from YAML (defaults in ``config/default.yaml``).

A wrong key or value raises :class:`agent.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stm_agent.agent.errors import ConfigError
from stm_agent.agent.triggers import TriggerRule, check_unique_names, rule_label


class _Strict(BaseModel):
    # protected_namespaces=(): fields such as encoder.model_dir are ours (pydantic < 2.10 warns on "model_")
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AcquisitionConfig(_Strict):
    """The folder source: where new scans arrive and how the folder is watched.

    ``folder`` and ``roots`` are the *acquisition roots*: the only folders scan files are read from
    (folder source, ``scan.saved`` paths, Nanonis ``WaitEndOfScan`` paths) and, with the results
    folders, the only ones result files are written into. A path resolving elsewhere (``..``, a
    symlink leading out) is refused with a counted error.
    """

    enabled: bool = True
    folder: Path = Path("./acquisition")
    roots: list[Path] = []
    patterns: list[str] = ["*.sxm"]
    recursive: bool = False
    polling: bool = False
    poll_interval_s: float = Field(1.0, gt=0)
    settle_s: float = Field(2.0, ge=0)
    complete_timeout_s: float = Field(600.0, gt=0)
    catch_up: bool = True


class ControllerConfig(_Strict):
    """The controller feed source: a ZeroMQ SUB socket receiving ``scan.sxm`` / ``scan.array`` /
    ``scan.saved`` messages from the STM controller (or ``stm-agent replay``)."""

    enabled: bool = False
    endpoint: str = "tcp://127.0.0.1:5560"
    topics: list[Literal["scan.sxm", "scan.array", "scan.saved"]] = ["scan.sxm", "scan.array", "scan.saved"]
    rcvhwm: int = Field(100, ge=1)
    max_payload_mb: float = Field(512.0, gt=0)
    max_queue_mb: float = Field(1024.0, gt=0)
    max_message_mb: float | None = Field(None, gt=0)
    drain_s: float = Field(10.0, ge=0)
    ack: bool = False
    curve_server_key: str | None = None


class NanonisConfig(_Strict):
    """The Nanonis TCP source: ``Scan.WaitEndOfScan`` through the TCP programming interface."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(6501, ge=1, le=65535)
    wait_timeout_s: float = Field(5.0, gt=0)
    reconnect_s: float = Field(5.0, gt=0)


class PublishConfig(_Strict):
    """ZeroMQ PUB socket the results are published on."""

    endpoint: str = "tcp://127.0.0.1:5556"
    sndhwm: int = Field(10000, ge=1)
    linger_ms: int = Field(1000, ge=0)
    heartbeat_s: float = Field(5.0, ge=0)
    query_endpoint: str | None = "tcp://127.0.0.1:5557"
    curve_secret_file: Path | None = None
    curve_clients_dir: Path | None = None


class MetricsConfig(_Strict):
    """Optional Prometheus ``/metrics`` endpoint (needs prometheus-client)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class ResultsConfig(_Strict):
    """Where results are kept."""

    store: Path = Path("./stm-agent-results/results.sqlite")
    out_dir: Path | None = None
    write_json: bool = True
    write_overlay: bool = True
    spool_dir: Path | None = None
    keep_received: bool = True
    spool_budget_mb: float | None = Field(10240.0, gt=0)
    spool_prune: bool = False


class ReferencesConfig(_Strict):
    """The reference library: one folder per species."""

    folder: Path = Path("./references")


class FlattenConfig(_Strict):
    """Background removal before segmentation."""

    plane: bool = True
    rows: Literal["none", "median", "mean"] = "median"


class SegmentConfig(_Strict):
    """Object detection (:mod:`agent.detect`): method, object size, polarity; the threshold methods'
    size window. ``lattice``: point defects on a resolved crystal lattice (:mod:`agent.lattice`: FFT
    Bragg-peak removal, defects of both polarities), classified few-shot against the references
    (:mod:`agent.fewshot`); ``auto`` takes it when the references are lattice defects and the frame
    is a resolved lattice."""

    method: Literal["auto", "scale", "template", "otsu", "value", "lattice"] = "auto"
    object_size_nm: float | None = Field(None, gt=0)
    threshold: float | None = None
    polarity: Literal["bright", "dark", "both"] = "bright"
    min_area_nm2: float | None = Field(None, ge=0)
    max_area_nm2: float | None = Field(None, gt=0)
    auto_area_sd: float = Field(2.0, gt=0)
    exclude_edge: bool = True
    smooth_px: float = Field(1.0, ge=0)


class NormaliseConfig(_Strict):
    """Crop normalisation: brightness and poses (UniMR)."""

    size_px: int = Field(64, ge=8, le=512)
    mean_grey: float = Field(120.0, ge=0, le=255)
    grey_tolerance: float = Field(20.0, ge=0)
    rotations: int = Field(36, ge=1, le=360)
    mirror: bool | Literal["auto"] = "auto"
    window_factor: float = Field(1.3, gt=0)
    contrast: Literal["frame", "crop"] = "crop"
    window_nm: float | None = Field(None, gt=0)


class EncoderConfig(_Strict):
    """Which encoder embeds crops.

    ``name: auto`` chooses between candidates (pixel + clip with ``model_dir``, else pixel +
    zernike) with UniMR's adaptive selection; ``select`` says whether per frame (``per_frame``) or
    once per session on the first frame with >= 2 objects (``once``). ``model_sha256`` pins the
    sha256 of the ONNX file: ``model.json`` in the same folder only proves integrity, the pin
    proves it is the model this configuration was made for.
    """

    name: Literal["pixel", "clip", "zernike", "auto"] = "pixel"
    select: Literal["per_frame", "once"] = "per_frame"
    model_dir: Path | None = None
    model_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    batch_size: int = Field(64, ge=1)
    threads: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "fp16", "int8", "int8-dynamic"] = "auto"


class MatchConfig(_Strict):
    """Cosine-similarity matching against the references.

    ``threshold: auto`` sets the threshold of each frame from the frame itself (conformal p-value
    against background windows, :mod:`agent.threshold`); a number fixes it. ``ratio`` is the
    best-vs-second-best species distance-ratio test (1 = off). ``descriptor_weight: auto`` uses
    the physical descriptors (weight :data:`AUTO_DESCRIPTOR_WEIGHT`) where the frame has physical
    units (.sxm), none for images without a pixel size. ``size_tolerance``: on frames with physical
    units a species is ruled out for an object whose extent differs from every reference of that
    species by more than this factor (:func:`agent.match.size_gate`; null = off).
    """

    threshold: float | Literal["auto"] = "auto"
    alpha: float = Field(0.05, gt=0, lt=1)
    ratio: float = Field(0.98, gt=0, le=1)
    descriptor_weight: float | Literal["auto"] = "auto"
    size_tolerance: float | None = Field(1.5, gt=1)

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, v):
        if v != "auto" and not -1.0 <= float(v) <= 1.0:
            raise ValueError("must be auto or a cosine similarity in -1..1")
        return v

    @field_validator("descriptor_weight")
    @classmethod
    def _weight_range(cls, v):
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError("must be auto or a weight in 0..1")
        return v


#: descriptor weight of ``match.descriptor_weight: auto`` on frames with physical units
AUTO_DESCRIPTOR_WEIGHT = 0.3


class DashboardConfig(_Strict):
    """The live dashboard in the browser (``pip install "stm-agent[dashboard]"``)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    token: str | None = None
    keep_images: int = Field(500, ge=0)
    history_frames: int = Field(2000, ge=1)


class BlueskyConfig(_Strict):
    """Bluesky event-model documents of the session (``pip install "stm-agent[bluesky]"``)."""

    enabled: bool = False
    folder: Path | None = None


class AgentConfig(_Strict):
    """The whole configuration of one agent."""

    agent_id: str = "stm-agent"
    channel: str = "auto"
    channel_candidates: list[str] = Field(default_factory=lambda: ["Z", "Current", "Frequency_Shift"], min_length=1)
    direction: Literal["forward", "backward"] = "forward"
    acquisition: AcquisitionConfig = AcquisitionConfig()
    controller: ControllerConfig = ControllerConfig()
    nanonis: NanonisConfig = NanonisConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    results: ResultsConfig = ResultsConfig()
    references: ReferencesConfig = ReferencesConfig()
    flatten: FlattenConfig = FlattenConfig()
    segment: SegmentConfig = SegmentConfig()
    normalise: NormaliseConfig = NormaliseConfig()
    encoder: EncoderConfig = EncoderConfig()
    match: MatchConfig = MatchConfig()
    triggers: list[TriggerRule] = []
    dashboard: DashboardConfig = DashboardConfig()
    bluesky: BlueskyConfig = BlueskyConfig()

    @field_validator("triggers")
    @classmethod
    def _unique_rules(cls, v: list[TriggerRule]) -> list[TriggerRule]:
        return check_unique_names(v)

    def digest(self) -> str:
        """sha256 (first 16 hex) of the effective configuration, for provenance."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_yaml_text() -> str:
    """The commented default configuration (``config/default.yaml``)."""
    return resources.files("stm_agent.config").joinpath("default.yaml").read_text(encoding="utf-8")


def _format_errors(err: ValidationError, origin: str, data: dict | None = None, overrides: dict | None = None,
                   override_origins: dict[str, str] | None = None) -> str:
    lines = []
    for e in err.errors():
        key = rule_label(data or {}, tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        where = origin
        node = overrides or {}
        for part in e["loc"]:  # the value came from the overrides (a command-line option)?
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            where = (override_origins or {}).get(".".join(str(p) for p in e["loc"]), "command line")
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                override_origins: dict[str, str] | None = None) -> AgentConfig:
    """Load the default configuration, update it with ``path`` (YAML) and ``overrides``.

    Parameters
    ----------
    path : str | Path, optional
        A YAML file; keys it omits keep their defaults.
    overrides : dict, optional
        Nested values applied last (command-line options).
    override_origins : dict[str, str], optional
        ``{"match.threshold": "--threshold"}``: what an error about an overridden key names as its
        origin (default ``"command line"``); errors about other keys name the file, or
        ``config/default.yaml``.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a key/value is invalid (message names the key and
        where the value came from).
    """
    data = yaml.safe_load(default_yaml_text()) or {}
    origin = "config/default.yaml"
    if path is not None:
        p = Path(path)
        try:
            user = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{p}: expected a mapping of keys at the top level")
        data = _deep_update(data, user)
        origin = str(p)
    if overrides:
        data = _deep_update(data, overrides)
    if isinstance(data.get("match"), dict) and "threshold_mode" in data["match"]:
        raise ConfigError(f"{origin}: match.threshold_mode was replaced by match.threshold: auto (the default, set "
                          "per frame without labels) or a number; remove threshold_mode")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin, data, overrides, override_origins)) from None


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out
