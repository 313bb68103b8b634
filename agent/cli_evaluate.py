"""``stm-agent evaluate``: score recognition against labelled ground truth (COCO, labelme, VOC, crops).

The logic is in :mod:`agent.evaluation`; this module parses options, prints the tables and writes
the JSON / PNG / CSV outputs. Register with ``app.command()(evaluate)`` in :mod:`agent.cli`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
import yaml
from rich.table import Table

from stm_agent.agent.console import console, esc, fail
from stm_agent.agent.errors import StmAgentError


def _overrides(items: list[str]) -> dict:
    """``["normalise.mirror=false", ...]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        d = out
        parts = k.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(v)
    return out


def _threshold(text: str) -> float | str:
    """``--threshold``: ``auto`` or a cosine similarity."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"--threshold expects auto or a number, got {text!r}") from None


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text).strip("_")


def evaluate(
    data: Path = typer.Argument(..., help="Labelled set: COCO folder/JSON, labelme JSON(s), VOC XML(s), or a "
                                "folder of class folders of crops."),
    mode: str = typer.Option("end-to-end", "--mode", help="end-to-end (segmentation + recognition) or "
                             "recognition (crops at the ground-truth boxes)."),
    compare: str = typer.Option("pixel", "--compare", help="Comma-separated entries: pixel, zernike, clip, auto, "
                                "unimr-as-released."),
    k: int = typer.Option(1, "--k", min=1, help="References drawn per class."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Number of reference draws (seeds seed0..seed0+N-1)."),
    seed0: int = typer.Option(0, "--seed", help="First seed."),
    reference_ids: Optional[str] = typer.Option(None, "--reference-ids", help="Explicit references: "
                                                "comma-separated annotation ids (one draw)."),
    references: Optional[Path] = typer.Option(None, "--references", help="Explicit reference library folder "
                                              "(`stm-agent refs` format; one draw)."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="Headline decision: auto (per image, "
                                            "without labels) or a number; default match.threshold."),
    iou: float = typer.Option(0.5, "--iou", help="IoU at or above which a detection matches a box."),
    pixel_size: float = typer.Option(1.0, "--pixel-size", help="nm per pixel of rendered images."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Exported CLIP folder (for clip / auto)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N images."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML configuration."),
    set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE (repeatable), e.g. "
                                   "normalise.mirror=false."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Output folder (JSON, PNGs, CSV)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the run (file stem; default: set name)."),
    csv_out: bool = typer.Option(False, "--csv", help="Also write the per-object CSV."),
) -> None:
    """Evaluate recognition on labelled data: per-class P/R/F1, confusion, threshold sweep, seed spread."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        fail('evaluate draws its confusion and sweep plots with matplotlib: pip install "stm-agent[plots]"')
    from stm_agent.adapters.labelled import load_labelled
    from stm_agent.adapters.plots import plot_confusion, plot_sweep
    from stm_agent.agent.config import load_config
    from stm_agent.agent.evaluation import EvalSettings, evaluate as run_eval, object_rows
    from stm_agent.agent.jsonsafe import jsonable

    try:
        over = _overrides(set_)
        if model_dir is not None:
            over.setdefault("encoder", {})["model_dir"] = str(model_dir)
        cfg = load_config(config, overrides=over)
        lset = load_labelled(data)
        st = EvalSettings(
            mode=mode, entries=[e.strip() for e in compare.split(",") if e.strip()], k=k,
            seeds=list(range(seed0, seed0 + seeds)),
            threshold=cfg.match.threshold if threshold is None else _threshold(threshold),
            ratio=cfg.match.ratio, alpha=cfg.match.alpha, iou=iou, pixel_size_nm=pixel_size,
            reference_ids=[int(a) for a in reference_ids.split(",")] if reference_ids else None,
            references=references, max_images=max_images,
        )
        report, scored = run_eval(lset, cfg, st)
    except StmAgentError as e:
        fail(e)
    report["overrides"] = over
    stem = _slug(name or lset.name)
    out.mkdir(parents=True, exist_ok=True)
    rows, cols = report["confusion_rows"], report["confusion_cols"]
    tab = Table(title=f"{esc(lset.name)} ({report['mode']}, threshold {st.threshold}, ratio {st.ratio}, "
                      f"{len(st.seeds) if not (st.reference_ids or st.references) else 1} draw(s), K={k})")
    for c in ("entry", "micro P", "micro R", "micro F1", "macro F1", "argmax F1", "t used", "best t", "F1@best",
              "det. R", "det. P", "count err", "chosen"):
        tab.add_column(c, justify="left" if c in ("entry", "chosen") else "right")
    curves = {}
    pm = lambda d: f"{d['mean']:.2f}±{d['std']:.2f}"  # noqa: E731
    for e, r in report["results"].items():
        s = r["summary"]
        mi, ma, b = s["micro"], s["macro"], s["best"]
        at = s["auto_threshold"]
        tab.add_row(esc(r["label"]), pm(mi["precision"]), pm(mi["recall"]), pm(mi["f1"]), pm(ma["f1"]),
                    pm(s["argmax"]["macro_f1"]), f"{at['mean']:.2f}" if at["n"] else f"{s['threshold']}",
                    f"{b['best_threshold']:.2f}", f"{b['best_f1']:.2f}",
                    pm(s["detection_recall"]) if "detection_recall" in s else "-",
                    pm(s["detection_precision"]) if "detection_precision" in s else "-",
                    pm(s["count_error"]["total"]) if "count_error" in s else "-",
                    ", ".join(f"{a}:{n}" for a, n in s.get("encoder_chosen", {}).items()) or "-")
        png = out / f"{stem}_{_slug(e)}_confusion.png"
        plot_confusion(np.array(s["confusion_summed"]), rows, cols,
                       f"{lset.name}: {r['label']}\n(summed over {s['n_draws']} draw(s), t={s['threshold']})", png)
        r["confusion_png"] = png.name
        sw = s["sweep_mean"]
        curves[r["label"]] = (np.array(sw["micro_f1"]), np.array(sw["micro_f1_std"]))
    sweep_png = out / f"{stem}_sweep.png"
    plot_sweep(st.thresholds, curves, f"{lset.name} ({report['mode']}): micro F1 vs threshold", sweep_png,
               st.threshold if st.threshold != "auto" else None)
    report["sweep_png"] = sweep_png.name
    console.print(tab)
    for e, r in report["results"].items():
        ct = Table(title=f"{esc(r['label'])}: per class (mean over draws)")
        for c in ("class", "P", "R", "F1", "support"):
            ct.add_column(c, justify="left" if c == "class" else "right")
        for c, v in r["summary"]["per_class"].items():
            ct.add_row(esc(c), f"{v['precision']['mean']:.2f}", f"{v['recall']['mean']:.2f}", f"{v['f1']['mean']:.2f}",
                       f"{v['support']['mean']:.0f}")
        console.print(ct)
        cm = Table(title=f"{esc(r['label'])}: confusion (rows true, columns predicted; summed over draws)")
        cm.add_column("true \\ pred")
        for c in cols:
            cm.add_column(esc(c), justify="right")
        for lab, row in zip(rows, r["summary"]["confusion_summed"]):
            cm.add_row(esc(lab), *map(str, row))
        console.print(cm)
    for e, lo in report.get("loco", {}).items():
        lt = Table(title=f"{esc(e)}: leave one class out (recognition-only; target: >= 80 % other, "
                         "remaining macro F1 within 0.05 of argmax)")
        for c in ("left out", "other share", "remaining macro F1", "argmax"):
            lt.add_column(c, justify="left" if c == "left out" else "right")
        for c, v in lo.items():
            lt.add_row(esc(c), pm(v["other_share"]), pm(v["remaining_macro_f1"]), pm(v["remaining_macro_f1_argmax"]))
        console.print(lt)
    js = out / f"{stem}.json"
    js.write_text(json.dumps(jsonable(report), indent=1, default=str), encoding="utf-8")
    console.print(f"wrote {esc(js)}, {esc(sweep_png.name)} and {len(report['results'])} confusion PNG(s) in {esc(out)}",
                  soft_wrap=True)
    if csv_out:
        path = out / f"{stem}_objects.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = None
            for e, lst in scored.items():
                used = st.seeds[:len(lst)]
                for row in object_rows(lset.name, e, lst, used):
                    if w is None:
                        w = csv.DictWriter(f, fieldnames=list(row))
                        w.writeheader()
                    w.writerow(row)
        console.print(f"wrote {esc(path)}", soft_wrap=True)
