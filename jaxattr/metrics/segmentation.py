"""Saliency maps scored as foreground segmentations (IIA `eval_batch`; metrics.md §5, iia.md §4.1).

Per image: R = min-max(map), prediction = R > mean(R) (foreground, strict), else background.
* pixel accuracy = sum #(pred == gt) / sum #pixels and IoU_c = sum intersection_c / sum union_c
  for c in {background, foreground}, mIoU = their mean: counts accumulated over the dataset;
* mAP = mean over images of sklearn `average_precision_score` on both channels flattened together
  (scores [1 - R ; R] against [gt == 0 ; gt == 1]); mF1 = mean over images of `f1_score(gt, pred)`.

`segmentation_scores` computes each image's counts and scores in one compiled call; `init`,
`update` and `result` accumulate them over a dataset in a small host-side state of int64 counts
and float64 sums (exact for any dataset size; device integers are 32-bit), so no dataset has to fit
in memory:

    totals = segmentation.init()
    for maps, masks in batches:
        totals = segmentation.update(totals, segmentation_scores(maps, masks))
    segmentation.result(totals)  # {'pixel_accuracy': ..., 'miou': ..., 'map': ..., 'mf1': ...}

A constant map has no foreground: R = 0, everything predicted background, and both AP channels 0 (the
reference's 0/0 NaNs set to 0 give the same). A map with NaN/inf is skipped (valid False) and counted.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxattr.metrics._common import min_max, safe_ratio
from jaxattr.resize import resize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentationScores:
    """One batch, per image."""

    correct: Int[Array, " b"]  # pixels where prediction == ground truth
    pixels: Int[Array, " b"]  # labelled pixels (all of them: the masks are binary)
    intersection: Int[Array, "b 2"]  # per class (background, foreground)
    union: Int[Array, "b 2"]
    average_precision: Float[Array, " b"]
    f1: Float[Array, " b"]
    valid: Bool[Array, " b"]  # finite map; invalid rows hold zeros and are skipped by `update`

    @property
    def pixel_accuracy(self) -> Float[Array, " b"]:
        """Each image's own pixel accuracy (the dataset value pools the counts instead)."""
        return self.correct / self.pixels

    @property
    def miou(self) -> Float[Array, " b"]:
        """Each image's mean IoU over the classes present in its prediction or mask."""
        present = self.union > 0
        iou = safe_ratio(self.intersection.astype(jnp.float32), self.union.astype(jnp.float32))
        return jnp.sum(iou, axis=1) / jnp.maximum(jnp.sum(present, axis=1), 1)


# ---------------------------------------------------------------------------------- ground truth


def binary_mask(array: Any, shape: tuple[int, int] | None = None, *, threshold: float | None = None) -> np.ndarray:
    """A ground-truth mask as a bool (h, w) array: True = foreground.

    array: (h, w), or (h, w, c) with equal channels (a grey mask saved as RGB).
    shape: the image's (height, width); another size is an error (resize the masks with the images,
      NEAREST, as the IIA protocol does).
    threshold: None: the mask must hold at most two values, 0 and one other (the foreground); with a
      threshold, foreground = array > threshold and any values are accepted (VOC: threshold=0 makes
      every class and the 255 boundary foreground, as IIA's `target > 0`)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        channels = array[..., :3] if array.shape[-1] != 1 else array
        if not (channels == channels[..., :1]).all():
            raise ValueError("a colour mask: expected a single-channel (grey) mask")
        array = channels[..., 0]
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D mask (height, width), got shape {array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(
            f"the mask is {array.shape[0]}x{array.shape[1]} but its image is {shape[0]}x{shape[1]}; "
            "give masks the image's size"
        )
    if threshold is not None:
        return array > threshold
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise ValueError(
            f"the mask holds values {shown}: expected 0 (background) and one foreground value; "
            "pass a threshold to take every value above it as foreground"
        )
    return array != 0


def _check_masks(masks: Any, maps: Array) -> tuple[Array, Array]:
    masks = jnp.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != maps.shape[0]:
        raise ValueError(f"masks must have shape (batch, height, width) matching the maps, got {masks.shape}")
    if masks.dtype != jnp.bool_:
        if not isinstance(masks, jax.core.Tracer) and not bool(jnp.all((masks == 0) | (masks == 1))):
            raise ValueError("masks must be binary (0/1 or bool); see binary_mask for mask files")
        masks = masks != 0
    if maps.shape[1:] != masks.shape[1:]:
        warnings.warn(
            f"maps are {maps.shape[1]}x{maps.shape[2]}, the masks {masks.shape[1]}x{masks.shape[2]}: "
            "resizing the maps (bilinear) to the masks' size",
            stacklevel=3,
        )
        maps = resize(maps, masks.shape[1:], "bilinear")
    return masks, maps


# ---------------------------------------------------------------------------------- per image


def average_precision(scores: Float[Array, " n"], labels: Bool[Array, " n"]) -> Float[Array, ""]:
    """sklearn's `average_precision_score(labels, scores)`: sum over distinct thresholds (descending)
    of (recall step) x precision, i.e. each positive weighted by the precision at the end of its
    group of tied scores. NaN without positives (sklearn warns and returns 0 there)."""
    order = jnp.argsort(scores, descending=True)
    s, y = scores[order], labels[order]
    true_positives = jnp.cumsum(y, dtype=jnp.int32)
    precision = true_positives / jnp.arange(1, s.shape[0] + 1, dtype=jnp.int32)
    index = jnp.arange(s.shape[0])
    group_end = jnp.concatenate([s[1:] != s[:-1], jnp.array([True])])
    end_of_group = jax.lax.cummin(jnp.where(group_end, index, s.shape[0]), reverse=True)
    return jnp.sum(jnp.where(y, precision[end_of_group], 0)) / true_positives[-1]


def _f1(prediction: Bool[Array, " n"], truth: Bool[Array, " n"]) -> Float[Array, ""]:
    """sklearn's binary f1_score; 0 when there is no positive in either (its zero_division default)."""
    tp = 2 * jnp.sum(prediction & truth, dtype=jnp.int32)
    wrong = jnp.sum(prediction ^ truth, dtype=jnp.int32)
    return safe_ratio(tp.astype(jnp.float32), (tp + wrong).astype(jnp.float32))


def _image_scores(relevance: Float[Array, "h w"], constant: Bool[Array, ""], truth: Bool[Array, "h w"]):
    prediction = relevance > jnp.mean(relevance)
    per_class = []
    for cls in (False, True):  # background, foreground
        p, t = prediction == cls, truth == cls
        inter = jnp.sum(p & t, dtype=jnp.int32)
        per_class.append((inter, jnp.sum(p, dtype=jnp.int32) + jnp.sum(t, dtype=jnp.int32) - inter))
    background = jnp.where(constant, 0.0, 1 - relevance)
    ap = average_precision(
        jnp.concatenate([background.ravel(), relevance.ravel()]), jnp.concatenate([~truth.ravel(), truth.ravel()])
    )
    return (
        jnp.sum(prediction == truth, dtype=jnp.int32),
        jnp.stack([i for i, _ in per_class]),
        jnp.stack([u for _, u in per_class]),
        ap,
        _f1(prediction.ravel(), truth.ravel()),
    )


@jax.jit
def _segmentation(maps, masks):
    valid = jnp.all(jnp.isfinite(maps), axis=(1, 2))
    maps = jnp.where(valid[:, None, None], maps, 0)
    relevance = min_max(maps)
    constant = jnp.max(maps, axis=(1, 2)) == jnp.min(maps, axis=(1, 2))
    correct, inter, union, ap, f1 = jax.vmap(_image_scores)(relevance, constant, masks)
    pixels = jnp.full(maps.shape[:1], maps.shape[1] * maps.shape[2], jnp.int32)
    zero = lambda x: jnp.where(valid.reshape(-1, *([1] * (x.ndim - 1))), x, 0)
    return SegmentationScores(*map(zero, (correct, pixels, inter, union, ap, f1)), valid)


def segmentation_scores(maps: Float[Array, "b h w"], masks: Bool[Array, "b h w"]) -> SegmentationScores:
    """Per-image segmentation counts and scores of saliency `maps` (high = foreground) against binary
    ground-truth `masks` (bool or 0/1). Maps of another size are resized to the masks with a warning."""
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (batch, height, width), got {maps.shape}")
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    masks, maps = _check_masks(masks, maps)
    return _segmentation(maps, masks)


# ---------------------------------------------------------------------------------- dataset totals


class SegmentationTotals(NamedTuple):
    """Running sums over a dataset (host NumPy, 64-bit)."""

    correct: np.int64
    pixels: np.int64
    intersection: np.ndarray  # (2,) int64
    union: np.ndarray  # (2,) int64
    average_precision: np.float64  # sum over images
    f1: np.float64  # sum over images
    images: np.int64
    skipped: np.int64  # images with a NaN/inf map


def init() -> SegmentationTotals:
    zero = np.int64(0)
    return SegmentationTotals(zero, zero, np.zeros(2, np.int64), np.zeros(2, np.int64), np.float64(0), np.float64(0), zero, zero)


def update(totals: SegmentationTotals, scores: SegmentationScores, rows: Any = None) -> SegmentationTotals:
    """`totals` plus the valid images of `scores`; `rows` (bool per row) leaves out padded rows."""
    valid = np.asarray(scores.valid, bool)
    real = np.ones_like(valid) if rows is None else np.asarray(rows, bool)
    use = valid & real
    add = lambda field, dtype: np.sum(np.asarray(getattr(scores, field), dtype)[use], axis=0)
    return SegmentationTotals(
        totals.correct + add("correct", np.int64),
        totals.pixels + add("pixels", np.int64),
        totals.intersection + add("intersection", np.int64),
        totals.union + add("union", np.int64),
        totals.average_precision + add("average_precision", np.float64),
        totals.f1 + add("f1", np.float64),
        totals.images + np.int64(use.sum()),
        totals.skipped + np.int64((real & ~valid).sum()),
    )


def result(totals: SegmentationTotals) -> dict[str, float]:
    """Dataset scores as the IIA scripts report them (counts over eps + totals, eps = np.spacing(1));
    NaN for mAP and mF1 when no image was scored."""
    eps = np.spacing(1, dtype=np.float64)
    iou = totals.intersection / (eps + totals.union)
    images = int(totals.images)
    mean = lambda total: float(total / images) if images else float("nan")
    return {
        "pixel_accuracy": float(totals.correct / (eps + totals.pixels)),
        "iou_background": float(iou[0]),
        "iou_foreground": float(iou[1]),
        "miou": float(iou.mean()),
        "map": mean(totals.average_precision),
        "mf1": mean(totals.f1),
        "images": images,
        "skipped": int(totals.skipped),
    }
