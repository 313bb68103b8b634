"""Which channel of a scan to analyse (``channel: auto``) and whether a channel is flat.

Constant-current topography (``Z``) is the usual image of an STM. In constant-height scans the
feedback is off: ``Z`` is constant (its spread is ~1e-15 m, the float resolution, or exactly 0
after levelling) and the molecules are in ``Current`` or, for nc-AFM, ``Frequency_Shift``.

``structure`` is a unit-free measure of how much a channel shows: the 1-99 % range of the levelled,
lightly smoothed frame divided by the frame's own pixel noise (:func:`agent.detect.pixel_noise`).
A flat channel scores ~0-2; real images 15-2000 on the shared scans.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from stm_agent.agent.domain import Scan
from stm_agent.agent.errors import ChannelError

log = logging.getLogger(__name__)

#: A channel whose structure is below this is flat (nothing above its own noise).
FLAT_STRUCTURE = 5.0


def structure(frame: np.ndarray) -> float:
    """Signal over the channel's own noise, unit-free (>= 0).

    ``frame`` float ``(ny, nx)`` (NaN = not acquired; every k-th line of a frame over 128 lines) is
    levelled (plane + row medians,
    :func:`agent.flatten.flatten`), smoothed with a Gaussian of 1 px, and its 1-99 % range is
    divided by the pixel noise of the levelled frame (Immerkaer-type MAD of neighbour differences).
    When that noise is 0 (quantised or constant data) the float32 resolution of the raw values is
    used instead, so a constant frame scores 0 and never divides by zero.
    """
    from stm_agent.agent.detect import pixel_noise
    from stm_agent.agent.flatten import flatten

    fr = np.asarray(frame, np.float32)
    if fr.shape[0] > 128:  # every k-th line is plenty for a range and a noise level
        fr = fr[:: fr.shape[0] // 128]
    fin = np.isfinite(fr)
    rows = fin.all(axis=1)
    if rows.sum() < 3 or fr.shape[1] < 3:
        return 0.0
    lev = flatten(fr[rows], plane=True, rows="median").astype(np.float32)
    if not np.isfinite(lev).all():
        return 0.0
    noise = pixel_noise(lev)
    floor = float(np.spacing(np.float32(np.median(np.abs(fr[fin]))) + np.float32(1e-30)))
    sm = cv2.GaussianBlur(lev, (0, 0), 1.0)
    lo, hi = np.percentile(sm, [1, 99])
    rng = float(hi - lo)
    if rng <= 0:
        return 0.0
    return rng / max(noise, floor, 1e-300)


def choose_channel(scan: Scan, requested: str, candidates: list[str], library_channel: str | None = None,
                   direction: str = "forward") -> tuple[str, dict]:
    """The channel to analyse and why.

    Parameters
    ----------
    scan : Scan
    requested : str
        ``auto`` or a channel name (``cfg.channel``).
    candidates : list[str]
        ``cfg.channel_candidates`` (the first one present is the default, normally ``Z``).
    library_channel : str | None
        The channel the reference library was recorded on (None: not recorded / no library).
    direction : str
        ``forward`` / ``backward``.

    Returns
    -------
    (channel, info) : the channel name; ``info`` = ``{channel, requested, reason, structure:
        {name: value}}`` (``warning`` when a channel chosen by hand, or the library's, is flat).

    Raises
    ------
    ChannelError
        The requested (or library) channel is not in the scan (the message lists the channels it
        has), or ``auto`` finds none of the candidates.
    """
    have = list(scan.channels)

    def _need(name: str, why: str) -> None:
        if name not in scan.channels or direction not in scan.channels[name]:
            raise ChannelError(scan.source, name, have, why)

    info: dict = {"requested": requested}
    if requested != "auto":
        _need(requested, "configured")
        s = structure(scan.frame(requested, direction))
        info.update(channel=requested, reason="configured", structure={requested: round(s, 2)})
        if s < FLAT_STRUCTURE:
            info["warning"] = (f"channel {requested} is flat in this frame (structure {s:.1f} < {FLAT_STRUCTURE:g}): "
                               "no object can stand out; try channel: auto")
        return requested, info
    if library_channel:
        _need(library_channel, "the reference library was recorded on it")
        s = structure(scan.frame(library_channel, direction))
        info.update(channel=library_channel, reason="the reference library's channel",
                    structure={library_channel: round(s, 2)})
        if s < FLAT_STRUCTURE:
            info["warning"] = f"channel {library_channel} (the library's) is flat in this frame (structure {s:.1f})"
        return library_channel, info
    present = [c for c in candidates if c in scan.channels and direction in scan.channels[c]]
    if not present:
        raise ChannelError(scan.source, "/".join(candidates), have, "channel: auto candidates")
    scores: dict[str, float] = {}
    first = present[0]
    scores[first] = structure(scan.frame(first, direction))
    if scores[first] >= FLAT_STRUCTURE:
        info.update(channel=first, reason=f"{first} shows structure", structure={first: round(scores[first], 2)})
        return first, info
    for c in present[1:]:
        scores[c] = structure(scan.frame(c, direction))
    best = max(scores, key=scores.get)
    info.update(channel=best, structure={k: round(v, 2) for k, v in scores.items()},
                reason=(f"{first} is flat (constant height); {best} has the most structure" if best != first
                        else f"every candidate is flat; {first} kept"))
    if scores[best] < FLAT_STRUCTURE:
        info["warning"] = "every candidate channel is flat in this frame"
    return best, info


def signal_up(frame: np.ndarray, unit: str | None) -> np.ndarray:
    """The frame with more signal pointing up: a tunnelling current (unit ``A``) recorded at
    negative bias is negative, larger in magnitude over a molecule, so it is negated when its
    median is negative (molecules then show bright, as in topography). Other channels unchanged."""
    if unit == "A":
        fin = np.isfinite(frame)
        if fin.any() and float(np.median(frame[fin])) < 0:
            return -frame
    return frame

