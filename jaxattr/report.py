"""Evaluation results on disk: metrics.json / metrics.csv, curve plots and an HTML report.

Input: the evaluated images' names and, per method, its per-image scores (metric -> one value per
image, NaN where an image could not be scored), optional per-image curves and per-image overlay
PNGs. `method_records` builds that from `jaxattr.metrics` results. `write_report` writes

* metrics.json: per image and method every score; per method and metric the mean over the scored
  images with a seeded 95% percentile-bootstrap confidence interval; the mean curves;
* metrics.csv: one row per (image, method, metric), then one 'mean' row per (method, metric) with
  the interval;
* curves_<name>.png: the mean curve of each method (images with NaN curves left out), the legend
  holding its summary (the mean AUC or score);
* report.html: one file with inline styles and no scripts: a table of means (best value per column
  marked, by the metric's direction), the curve plots, and per image a row of overlays, one per
  method, with that image's scores. Images are referenced relative to the report, or embedded as
  data URIs (embed_images=True) so the file can travel alone.

Every file is written atomically (`jaxattr.viz.write_atomically`). matplotlib and Jinja2 come with
the optional extra `report` (`pip install jaxattr[report]`) and are imported only when writing.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import mimetypes
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxattr.viz import write_atomically

# Metric names the evaluation writes, with their direction (True: higher is better) and a label.
METRICS: dict[str, tuple[bool, str]] = {
    "rise_deletion": (False, "RISE deletion AUC"),
    "rise_insertion": (True, "RISE insertion AUC"),
    "igos_deletion": (False, "I-GOS deletion"),
    "igos_insertion": (True, "I-GOS insertion"),
    "pos": (False, "POS accuracy AUC"),
    "neg": (True, "NEG accuracy AUC"),
    "del": (False, "DEL probability AUC (POS)"),
    "ins": (True, "INS probability AUC (NEG)"),
    "adp": (False, "ADP %"),
    "pic": (True, "PIC %"),
    "add": (True, "ADD %"),
    "pixel_accuracy": (True, "pixel accuracy"),
    "miou": (True, "mIoU"),
    "ap": (True, "AP"),
    "f1": (True, "F1"),
}

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class CurveSet:
    """Per-image curves of one game: y (images, points) over x (points); NaN rows are left out."""

    x: np.ndarray
    y: np.ndarray
    summary: float  # shown in the legend: the mean AUC (RISE) or score (I-GOS) over the images


@dataclasses.dataclass(frozen=True)
class MethodRecords:
    """One method's results on the report's images (every sequence aligned with them)."""

    name: str
    scores: Mapping[str, Sequence[float]]  # metric -> per-image value, NaN: not scored
    curves: Mapping[str, CurveSet] = dataclasses.field(default_factory=dict)
    overlays: Sequence[str | os.PathLike | None] = ()  # per-image overlay PNG
    dataset: Mapping[str, float] = dataclasses.field(default_factory=dict)  # pooled scores (segmentation)


@dataclasses.dataclass(frozen=True)
class Summary:
    mean: float
    low: float
    high: float
    n: int  # images with a finite value


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    json: Path
    csv: Path
    html: Path
    curves: tuple[Path, ...]


# ---------------------------------------------------------------------------------- statistics


def summarize(
    values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> Summary:
    """Mean of the finite values and its percentile-bootstrap confidence interval: `samples`
    resamples of the images with replacement from numpy's Generator(PCG64(seed)), so the same
    values always give the same interval. One value: an interval of width 0; none: NaN."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Summary(math.nan, math.nan, math.nan, 0)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = v[rng.integers(0, v.size, size=(samples, v.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Summary(float(v.mean()), float(low), float(high), int(v.size))


def mean_curve(curves: CurveSet) -> np.ndarray:
    """The mean over the images whose curve is finite (NaN if none is)."""
    y = np.asarray(curves.y, np.float64)
    finite = np.isfinite(y).all(axis=1)
    return y[finite].mean(axis=0) if finite.any() else np.full(y.shape[1], np.nan)


# ------------------------------------------------------------------------ from metric results


def _per_image(array: Any) -> list[float]:
    return [float(v) for v in np.asarray(array, np.float64)]


def method_records(
    name: str,
    results: Mapping[str, Any],
    overlays: Sequence[str | os.PathLike | None] = (),
    dataset: Mapping[str, float] | None = None,
) -> MethodRecords:
    """MethodRecords from `jaxattr.metrics` results of one method on the same images, keyed by what
    they are: 'rise_deletion' / 'rise_insertion' (RiseCurves: AUC), 'igos_deletion' /
    'igos_insertion' (IgosCurves: the fixed score), 'positive' / 'negative' (PerturbationCurves:
    POS + DEL / NEG + INS), 'confidence' (ConfidenceChange: ADP, PIC, ADD), 'segmentation'
    (SegmentationScores: per-image pixel accuracy, mIoU, AP, F1; pass segmentation.result(...) as
    `dataset` for the pooled values)."""
    from jaxattr import metrics

    scores: dict[str, list[float]] = {}
    curves: dict[str, CurveSet] = {}
    for key, result in results.items():
        if isinstance(result, metrics.RiseCurves):
            scores[key] = _per_image(result.auc)
            curves[key] = CurveSet(np.asarray(result.fractions), np.asarray(result.scores), summarize(scores[key]).mean)
        elif isinstance(result, metrics.IgosCurves):
            scores[key] = _per_image(result.score)
            curves[key] = CurveSet(np.asarray(result.fractions), np.asarray(result.scores), summarize(scores[key]).mean)
        elif isinstance(result, metrics.PerturbationCurves):
            accuracy, probability = ("pos", "del") if key == "positive" else ("neg", "ins")
            scores[accuracy] = _per_image(result.accuracy_auc)
            scores[probability] = _per_image(result.probability_auc)
        elif isinstance(result, metrics.ConfidenceChange):
            scores.update(adp=_per_image(result.adp), pic=_per_image(result.pic), add=_per_image(result.add))
        elif isinstance(result, metrics.SegmentationScores):
            invalid = ~np.asarray(result.valid)
            masked = lambda a: np.where(invalid, np.nan, np.asarray(a, np.float64))
            scores.update(
                pixel_accuracy=_per_image(masked(result.pixel_accuracy)),
                miou=_per_image(masked(result.miou)),
                ap=_per_image(masked(result.average_precision)),
                f1=_per_image(masked(result.f1)),
            )
        else:
            raise TypeError(f"{key}: not a jaxattr.metrics result ({type(result).__name__})")
    return MethodRecords(name, scores, curves, tuple(overlays), dict(dataset or {}))


# ---------------------------------------------------------------------------------- writing


def _check(images: Sequence[str], methods: Sequence[MethodRecords]) -> None:
    if not methods:
        raise ValueError("no methods to report")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    for m in methods:
        for metric, values in m.scores.items():
            if len(values) != len(images):
                raise ValueError(f"{m.name}: {len(values)} {metric} values for {len(images)} images")
        if m.overlays and len(m.overlays) != len(images):
            raise ValueError(f"{m.name}: {len(m.overlays)} overlays for {len(images)} images")
        for key, c in m.curves.items():
            if np.shape(c.y) != (len(images), len(c.x)):
                raise ValueError(f"{m.name}: {key} curves of shape {np.shape(c.y)}, expected ({len(images)}, {len(c.x)})")


def _metric_names(methods: Sequence[MethodRecords]) -> list[str]:
    """Every metric of any method: known ones in METRICS order, then the others as they come."""
    seen = list(dict.fromkeys(k for m in methods for k in m.scores))
    return [k for k in METRICS if k in seen] + [k for k in seen if k not in METRICS]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=1, allow_nan=False) + "\n").encode()


def _csv_bytes(rows: list[list[Any]]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode()


def _plot_curves(path: Path, key: str, methods: Sequence[MethodRecords]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(5.5, 4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for m in methods:
        if key in m.curves:
            c = m.curves[key]
            ax.plot(c.x, mean_curve(c), label=f"{m.name} ({c.summary:.3f})", linewidth=1.6)
    direction, label = METRICS.get(key, (None, key))
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="fraction of the image changed", ylabel="class probability (mean)")
    ax.set_title(label if key not in METRICS else f"{label}: mean curve per method")
    ax.grid(alpha=0.3)
    ax.legend(title="method (AUC)" if key.startswith("rise") else "method (score)", fontsize=8)
    write_atomically(path, lambda f: fig.savefig(f, format="png"))


def _image_source(path: str | os.PathLike | None, out: Path, embed: bool) -> str | None:
    """What an <img src> needs: a data URI, or the path relative to the report (POSIX, URL-quoted)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report image {path} does not exist")
    if embed:
        kind = mimetypes.guess_type(path.name)[0] or "image/png"
        return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    from urllib.parse import quote

    return quote(Path(os.path.relpath(path.resolve(), out.resolve())).as_posix())


def _best(summaries: dict[str, dict[str, Summary]], metric: str) -> set[str]:
    """Methods whose mean is the best of the column (ties all marked); none for unknown directions."""
    if metric not in METRICS:
        return set()
    means = {m: s[metric].mean for m, s in summaries.items() if metric in s and math.isfinite(s[metric].mean)}
    if len(means) < 2:
        return set()
    best = (max if METRICS[metric][0] else min)(means.values())
    return {m for m, v in means.items() if v == best}


def write_report(
    out: str | os.PathLike,
    images: Sequence[str],
    methods: Sequence[MethodRecords],
    *,
    image_paths: Sequence[str | os.PathLike | None] | None = None,
    title: str = "jaxattr evaluation",
    settings: Mapping[str, Any] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    embed_images: bool = False,
) -> ReportFiles:
    """Write metrics.json, metrics.csv, curves_<game>.png and report.html into `out`.

    images: one name per evaluated image (e.g. file stems). image_paths: optional originals shown
    first in each row. settings: recorded in metrics.json and shown in the report (model, step...).
    samples, seed: the bootstrap. embed_images: data URIs instead of relative paths."""
    import jinja2

    _check(images, methods)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric_names = _metric_names(methods)
    summaries = {
        m.name: {k: summarize(v, samples=samples, seed=seed) for k, v in m.scores.items()} for m in methods
    }

    payload = {
        "title": title,
        "settings": dict(settings or {}),
        "bootstrap": {"samples": samples, "seed": seed, "confidence": CONFIDENCE, "method": "percentile"},
        "images": list(images),
        "metrics": {k: {"higher_is_better": METRICS[k][0], "label": METRICS[k][1]} for k in metric_names if k in METRICS},
        "methods": {
            m.name: {
                "per_image": {k: [_finite_or_none(float(v)) for v in vals] for k, vals in m.scores.items()},
                "summary": {
                    k: {"mean": _finite_or_none(s.mean), "ci_low": _finite_or_none(s.low),
                        "ci_high": _finite_or_none(s.high), "n": s.n}
                    for k, s in summaries[m.name].items()
                },
                "curves": {
                    k: {"x": [float(x) for x in c.x], "mean": [_finite_or_none(float(y)) for y in mean_curve(c)],
                        "summary": _finite_or_none(float(c.summary))}
                    for k, c in m.curves.items()
                },
                "dataset": {k: _finite_or_none(float(v)) for k, v in m.dataset.items()},
            }
            for m in methods
        },
    }
    json_path, csv_path, html_path = out / "metrics.json", out / "metrics.csv", out / "report.html"
    write_atomically(json_path, lambda f: f.write(_json_bytes(payload)))

    rows: list[list[Any]] = [["kind", "image", "method", "metric", "value", "ci_low", "ci_high", "n"]]
    for i, image in enumerate(images):
        for m in methods:
            for k in metric_names:
                if k in m.scores:
                    rows.append(["image", image, m.name, k, repr(float(m.scores[k][i])), "", "", ""])
    for m in methods:
        for k in metric_names:
            if k in summaries[m.name]:
                s = summaries[m.name][k]
                rows.append(["mean", "", m.name, k, repr(s.mean), repr(s.low), repr(s.high), s.n])
    write_atomically(csv_path, lambda f: f.write(_csv_bytes(rows)))

    curve_keys = list(dict.fromkeys(k for m in methods for k in m.curves))
    curve_files = []
    for key in curve_keys:
        path = out / f"curves_{key}.png"
        _plot_curves(path, key, methods)
        curve_files.append(path)

    source = lambda p: _image_source(p, out, embed_images)
    columns = [(k, *METRICS.get(k, (None, k))) for k in metric_names]
    table = [
        {
            "method": m.name,
            "cells": [
                {"summary": summaries[m.name].get(k), "best": m.name in _best(summaries, k)} for k in metric_names
            ],
        }
        for m in methods
    ]
    dataset_keys = list(dict.fromkeys(k for m in methods for k in m.dataset))
    image_rows = [
        {
            "name": name,
            "original": source(image_paths[i]) if image_paths else None,
            "cells": [
                {
                    "method": m.name,
                    "overlay": source(m.overlays[i]) if m.overlays else None,
                    "scores": [(k, float(m.scores[k][i])) for k in metric_names if k in m.scores],
                }
                for m in methods
            ],
        }
        for i, name in enumerate(images)
    ]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("jaxattr", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    html = environment.get_template("report.html.j2").render(
        title=title,
        settings=dict(settings or {}),
        columns=columns,
        table=table,
        bootstrap=payload["bootstrap"],
        dataset_keys=dataset_keys,
        datasets=[(m.name, [m.dataset.get(k) for k in dataset_keys]) for m in methods if m.dataset],
        curves=[(key, source(path)) for key, path in zip(curve_keys, curve_files)],
        images=image_rows,
        has_originals=bool(image_paths),
        methods=[m.name for m in methods],
    )
    write_atomically(html_path, lambda f: f.write(html.encode()))
    return ReportFiles(json_path, csv_path, html_path, tuple(curve_files))
