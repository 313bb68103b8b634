"""Evaluation figures (matplotlib, Agg backend): confusion matrix and F1-vs-threshold sweep PNGs.

Small files (dpi 80, < 200 kB) for docs/results/.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(conf: np.ndarray, rows: list[str], cols: list[str], title: str, path: str | Path) -> Path:
    """Confusion matrix PNG (counts annotated; rows = true, columns = predicted incl. other/missed).

    Parameters
    ----------
    conf : int ``(R, C)``; rows, cols : labels; title : str; path : output PNG.
    """
    c = np.asarray(conf)
    n = max(len(rows), len(cols))
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * n, 1.8 + 0.45 * n), dpi=80)
    ax.imshow(np.log1p(c), cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    hi = np.log1p(c).max() if c.size else 1
    for (i, j), v in np.ndenumerate(c):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if np.log1p(v) > 0.6 * hi else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_sweep(thresholds: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str,
               path: str | Path, marker: float | None = None) -> Path:
    """Micro F1 against the similarity threshold, one line (mean) and band (+- std over draws) per entry.

    Parameters
    ----------
    thresholds : ``(T,)``; curves : {label: (mean (T,), std (T,))}; marker : a threshold to mark
    (the configured one).
    """
    t = np.asarray(thresholds)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    for label, (m, s) in curves.items():
        m, s = np.asarray(m), np.asarray(s)
        (ln,) = ax.plot(t, m, label=label, lw=1.5)
        ax.fill_between(t, m - s, m + s, color=ln.get_color(), alpha=0.15)
        i = int(np.argmax(m))
        ax.plot([t[i]], [m[i]], "o", color=ln.get_color(), ms=4)
    if marker is not None:
        ax.axvline(marker, color="grey", ls=":", lw=1)
    ax.set_xlabel("similarity threshold")
    ax.set_ylabel("micro F1")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
