"""`evaluate_maps`: every selected metric of `jaxattr.metrics` on one batch of saliency maps, and
the per-image storage of the results that `jaxattr evaluate` resumes from.

Metric groups (the names `--metrics` takes):

* 'rise': RISE deletion and insertion (metrics.md §1) on the full-resolution map;
* 'igos': the I-GOS deletion and insertion (§2) on a low-resolution mask (low = salient) over
  I-GOS's blurred baseline (`jaxattr.methods.igos.igos_baselines`). I-GOS's own masks are passed as `igos_masks`; every other method's map
  is averaged over the cells of a `mask_size` x `mask_size` grid and negated (`saliency_cells`).
  IGOS_pp scores only its own masks; the I-GOS paper compares other methods on the same metric,
  so they need a mask on the same grid, and a cell's saliency is the mean saliency of its pixels;
* 'perturbation': BEE's POS and NEG removal curves (accuracy AUC; DEL/INS probability AUCs, §4);
* 'confidence': ADP, PIC and ADD (§4);
* 'segmentation': IIA's segmentation scores against ground-truth masks (§5).

The results come back keyed as `jaxattr.report.method_records` reads them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxattr.metrics import (
    DEFAULT_CHUNK,
    ConfidenceChange,
    IgosCurves,
    PerturbationCurves,
    RiseCurves,
    SegmentationScores,
    confidence_change,
    igos_deletion,
    igos_insertion,
    perturbation_curves,
    rise_deletion,
    rise_insertion,
    segmentation_scores,
)
from jaxattr.methods.igos import igos_baselines
from jaxattr.metrics.perturbation import MODES as PERTURBATION_MODES

# Metric group -> the keys of its results (as `report.method_records` reads them) and the names of
# the per-image scores `report.method_records` makes of them.
METRIC_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rise": (("rise_deletion", "rise_insertion"), ("rise_deletion", "rise_insertion")),
    "igos": (("igos_deletion", "igos_insertion"), ("igos_deletion", "igos_insertion")),
    "perturbation": (("positive", "negative"), ("pos", "del", "neg", "ins")),
    "confidence": (("confidence",), ("adp", "pic", "add")),
    "segmentation": (("segmentation",), ("pixel_accuracy", "miou", "ap", "f1")),
}
DEFAULT_METRICS: tuple[str, ...] = ("rise", "igos", "perturbation", "confidence")
# The I-GOS metric's grid for maps of methods other than I-GOS: I-GOS's default mask size.
IGOS_MASK_SIZE = 28

RESULT_TYPES: dict[str, type] = {
    "rise_deletion": RiseCurves,
    "rise_insertion": RiseCurves,
    "igos_deletion": IgosCurves,
    "igos_insertion": IgosCurves,
    "positive": PerturbationCurves,
    "negative": PerturbationCurves,
    "confidence": ConfidenceChange,
    "segmentation": SegmentationScores,
}
# Result fields that describe the curve, not an image (no batch axis).
_SHARED_FIELDS = frozenset({"fractions"})


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a tuple of known metric groups, in METRIC_GROUPS order, without repeats."""
    unknown = [n for n in names if n not in METRIC_GROUPS]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(unknown)}; metrics: {', '.join(METRIC_GROUPS)}")
    if not names:
        raise ValueError(f"no metrics selected; metrics: {', '.join(METRIC_GROUPS)}")
    return tuple(n for n in METRIC_GROUPS if n in names)


def score_names(groups: Sequence[str]) -> list[str]:
    """The per-image score names of the metric groups `groups`."""
    return [score for group in check_metrics(groups) for score in METRIC_GROUPS[group][1]]


# ------------------------------------------------------------------------- the I-GOS metric's inputs


def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) rows averaging the input bins torch's adaptive_avg_pool gives each
    output: [floor(i n / m), ceil((i + 1) n / m))."""
    matrix = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-(i + 1) * size_in // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def saliency_cells(maps: Float[Array, "b h w"], size: int = IGOS_MASK_SIZE) -> Float[Array, "b s s"]:
    """Saliency maps (high = salient) as I-GOS metric masks (low = salient) on a size x size grid:
    minus the mean of each cell's pixels (torch's adaptive_avg_pool2d bins). A map with NaN/inf
    gives NaN cells, which the metric reports as invalid."""
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (batch, height, width), got {maps.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= min(maps.shape[1:]):
        raise ValueError(f"mask size must be an integer from 1 to the maps' side {min(maps.shape[1:])}, got {size!r}")
    rows = jnp.asarray(_area_matrix(maps.shape[1], size), maps.dtype)
    columns = jnp.asarray(_area_matrix(maps.shape[2], size), maps.dtype)
    pooled = jnp.einsum("ih,bhw,jw->bij", rows, maps, columns, precision=jax.lax.Precision.HIGHEST)
    return -pooled


# ----------------------------------------------------------------------------------- evaluation


def evaluate_maps(
    model: Any,
    images: Float[Array, "b h w 3"],
    maps: Float[Array, "b h w"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    step: int | str = "single",
    chunk: int | None = DEFAULT_CHUNK,
    fill: Float[Array, "3"] | None = None,
    igos_masks: Float[Array, "b s t"] | None = None,
    mask_size: int = IGOS_MASK_SIZE,
    baselines: Float[Array, "*b h w 3"] | Callable[[Array], Array] = igos_baselines,
    ground_truth: Bool[Array, "b h w"] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """The metric groups `metrics` of saliency `maps` (high = salient, unclipped: `Explanation.maps`)
    on `images`, explaining `targets` (default: each image's predicted class).

    Returns {result key: jaxattr.metrics result} (keys in `METRIC_GROUPS`), the input of
    `jaxattr.report.method_records`. A row whose map (or I-GOS mask) holds NaN/inf comes back NaN
    with valid False; the others are unaffected.

    step, chunk, fill: as `jaxattr.metrics.rise_deletion` (`fill` also for the perturbation tests).
    igos_masks: I-GOS's own masks (low = salient); None: `saliency_cells(maps, mask_size)`.
    baselines: the I-GOS metric's substrate, an array broadcastable to the images or a function
      images -> baselines (default: I-GOS's blurred baseline).
    ground_truth: binary foreground masks, needed by 'segmentation'."""
    groups = check_metrics(metrics)
    images, maps = jnp.asarray(images), jnp.asarray(maps)
    if "segmentation" in groups and ground_truth is None:
        raise ValueError("the 'segmentation' metric needs ground_truth masks")
    common = dict(devices=devices)
    results: dict[str, Any] = {}
    if "rise" in groups:
        options = dict(fill=fill, step=step, chunk=chunk, **common)
        results["rise_deletion"] = rise_deletion(model, images, maps, targets, **options)
        results["rise_insertion"] = rise_insertion(model, images, maps, targets, **options)
    if "igos" in groups:
        masks = saliency_cells(maps, mask_size) if igos_masks is None else igos_masks
        substrate = baselines(images) if callable(baselines) else baselines
        results["igos_deletion"] = igos_deletion(model, images, masks, substrate, targets, chunk=chunk, **common)
        results["igos_insertion"] = igos_insertion(model, images, masks, substrate, targets, chunk=chunk, **common)
    if "perturbation" in groups:
        for mode in PERTURBATION_MODES:
            results[mode] = perturbation_curves(model, images, maps, targets, mode=mode, fill=fill, chunk=chunk, **common)
    if "confidence" in groups:
        results["confidence"] = confidence_change(model, images, maps, targets, fill=fill, **common)
    if "segmentation" in groups:
        results["segmentation"] = segmentation_scores(maps, ground_truth)
    return results


def valid_rows(results: Mapping[str, Any]) -> np.ndarray:
    """Per image: whether every result scored it (finite map, mask and image)."""
    flags = [np.asarray(r.valid, bool) for r in results.values()]
    return np.logical_and.reduce(flags) if flags else np.ones(0, bool)


# ------------------------------------------------------------------------- per-image storage


def result_rows(results: Mapping[str, Any], n: int) -> list[dict[str, np.ndarray]]:
    """The first `n` images' parts of `results`, one flat {"key.field": array} per image (what
    `jaxattr evaluate` stores per image; `stack_rows` puts them back together)."""
    rows: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for key, result in results.items():
        for field, value in vars(result).items():
            value = np.asarray(value)
            for i, row in enumerate(rows):
                row[f"{key}.{field}"] = value if field in _SHARED_FIELDS else value[i]
    return rows


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """`result_rows` of any images put back into results over those images, in order."""
    if not rows:
        raise ValueError("no rows to stack")
    fields: dict[str, dict[str, Any]] = {}
    for name in rows[0]:
        key, field = name.split(".", 1)
        values = [np.asarray(row[name]) for row in rows]
        fields.setdefault(key, {})[field] = values[0] if field in _SHARED_FIELDS else np.stack(values)
    return {key: RESULT_TYPES[key](**values) for key, values in fields.items()}
