"""Perturbation tests of the IIA authors' group (BEE repository; metrics.md §4).

* `perturbation_curves`: POS (mode='positive') removes the most relevant pixels first, NEG
  (mode='negative') the least relevant first: at each fraction s of 0.1, ..., 0.9 the int(h w s)
  top pixels of the map (of minus the map for NEG) are set to `fill` in all channels. Each point
  reads the top-1 accuracy against the class (correct = argmax == class) and the class's softmax
  probability; the unperturbed image is prepended, and the AUCs are sklearn's `auc` over
  x = np.arange(0, 1, 0.1), times 100. BEE's "DEL" is the POS probability AUC and its "INS" the NEG
  probability AUC (not RISE's games). Lower POS/DEL and higher NEG/INS are better.
* `confidence_change`: ADP, PIC and ADD (`evaluations.py`), in percent per image; their means over a
  dataset are the reference's numbers.

BEE works on the normalised tensor, where 0 is the mean colour: removing a pixel is `fill` (default:
the model's mean colour) and image * map is fill + (image - fill) * map in pixel space. The class is
the predicted one unless targets are given (BEE passes the predicted label).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxattr.metrics._common import (
    min_max,
    safe_ratio,
    DEFAULT_CHUNK,
    check_chunk,
    check_maps,
    classes_of,
    curve,
    descending_ranks,
    invalid_to_nan,
    probabilities,
    resolve_fill,
    run_batched,
    valid_rows,
)

Mode = Literal["positive", "negative"]
MODES: tuple[str, ...] = ("positive", "negative")

# BEE's perturbation steps, as the float literals it multiplies the pixel count by.
PERTURBATION_STEPS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerturbationCurves:
    """POS or NEG perturbation of a batch; per-image AUCs average to BEE's dataset AUCs."""

    correct: Float[Array, "b n"]  # 1 where the argmax is still the class: unperturbed, then each step
    probabilities: Float[Array, "b n"]  # the class's softmax probability at the same points
    accuracy_auc: Float[Array, " b"]  # POS / NEG: sklearn auc(x, correct) * 100
    probability_auc: Float[Array, " b"]  # DEL (POS) / INS (NEG): sklearn auc(x, probabilities) * 100
    fractions: Float[Array, " n"]  # x = np.arange(0, 1, 0.1)
    classes: Int[Array, " b"]
    valid: Bool[Array, " b"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConfidenceChange:
    """ADP, PIC and ADD per image, in percent (BEE reports their means)."""

    adp: Float[Array, " b"]  # 100 max(0, p - p(image * map)) / p: average drop, lower is better
    pic: Float[Array, " b"]  # 100 [p(image * map) > p]: increase in confidence, higher is better
    add: Float[Array, " b"]  # 100 max(0, p - p(image * (1 - map))) / p: drop in deletion, higher is better
    classes: Int[Array, " b"]
    valid: Bool[Array, " b"]


def perturbation_fractions() -> np.ndarray:
    """The x values of BEE's AUC: np.arange(0, 1, 0.1) (float64, with its rounding)."""
    return np.arange(0, 1, 0.1)


def trapezoid_weights(x: np.ndarray) -> np.ndarray:
    """w with sum(w * y) = np.trapz(y, x)."""
    dx = np.diff(x)
    return np.concatenate([dx, [0.0]]) / 2 + np.concatenate([[0.0], dx]) / 2


def removed_counts(pixels: int) -> np.ndarray:
    """Pixels removed at each point: 0 (unperturbed), then int(pixels * s) for BEE's steps."""
    return np.array([0] + [int(pixels * s) for s in PERTURBATION_STEPS])


@functools.partial(jax.jit, static_argnames=("mode", "chunk"))
def _perturbation(forward, images, targets, maps, fill, *, mode: Mode, chunk: int | None):
    valid, maps = valid_rows(images, maps)
    classes = classes_of(forward, images, targets)
    # BEE's top-k of the map (POS) or of its negation (NEG), ties highest flat index first.
    ranks = descending_ranks(maps if mode == "positive" else -maps)[..., None]
    fill = jnp.broadcast_to(jnp.asarray(fill, images.dtype), images.shape)

    def readout(logits):
        correct = (jnp.argmax(logits, axis=-1) == classes).astype(logits.dtype)
        return correct, probabilities(logits, classes)

    counts = jnp.asarray(removed_counts(images.shape[1] * images.shape[2]), jnp.int32)
    correct, probs = curve(forward, lambda k: jnp.where(ranks < k, fill, images), counts, chunk, readout)
    weights = jnp.asarray(100 * trapezoid_weights(perturbation_fractions()), probs.dtype)
    aucs = (jnp.sum(correct * weights, axis=1), jnp.sum(probs * weights, axis=1))
    return invalid_to_nan(valid, (correct, probs, *aucs)), classes, valid


def perturbation_curves(
    forward: Any,
    images: Float[Array, "b h w 3"],
    maps: Float[Array, "b h w"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    mode: Mode = "positive",
    fill: Float[Array, "3"] | None = None,
    chunk: int | None = DEFAULT_CHUNK,
    devices: Sequence[jax.Device] | None = None,
) -> PerturbationCurves:
    """BEE's POS ('positive') or NEG ('negative') perturbation test (metrics.md §4) on a batch.

    maps: saliency (b, h, w), high = relevant; resized to the images with a warning if needed;
      NaN/inf rows come back NaN with valid=False. The top-k order is `descending_ranks` (torch.topk's
      tie order is unspecified). fill: the removed pixels' colour, default the model's mean colour.
    Other arguments as `jaxattr.metrics.rise_deletion`."""
    if mode not in MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; expected one of {MODES}")
    images = jnp.asarray(images)
    maps = check_maps(maps, images)
    check_chunk(chunk)
    fill = resolve_fill(forward, fill)
    core = functools.partial(_perturbation, mode=mode, chunk=chunk)
    results, classes, valid = run_batched(core, forward, images, targets, [maps], [fill], devices)
    fractions = jnp.asarray(perturbation_fractions(), results[1].dtype)
    return PerturbationCurves(*results, fractions, classes, valid)


@jax.jit
def _confidence(forward, images, targets, maps, fill):
    valid, maps = valid_rows(images, maps)
    classes = classes_of(forward, images, targets)
    weight = min_max(maps)[..., None]  # BEE's maps are min-max scaled; a constant map is all 0
    fill = jnp.asarray(fill, images.dtype)
    kept = fill + (images - fill) * weight  # image * map on the normalised tensor
    removed = fill + (images - fill) * (1 - weight)  # image * (1 - map)
    logits = forward(jnp.concatenate([images, kept, removed]))
    full, on_map, off_map = jnp.split(probabilities(logits, jnp.tile(classes, 3)), 3)
    adp = 100 * safe_ratio(jnp.maximum(0, full - on_map), full)
    pic = 100 * (on_map > full).astype(full.dtype)
    add = 100 * safe_ratio(jnp.maximum(0, full - off_map), full)
    return invalid_to_nan(valid, (adp, pic, add)), classes, valid


def confidence_change(
    forward: Any,
    images: Float[Array, "b h w 3"],
    maps: Float[Array, "b h w"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    fill: Float[Array, "3"] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> ConfidenceChange:
    """ADP, PIC and ADD (BEE `evaluations.py`; metrics.md §4) per image, in percent.

    The map is min-max scaled to [0, 1] (BEE's maps are; a constant map becomes 0) and multiplies
    the image in normalised space: in pixels, fill + (image - fill) * map. p is the softmax
    probability of the class (default the predicted one) on the full image. Three images per input
    in one forward pass."""
    images = jnp.asarray(images)
    maps = check_maps(maps, images)
    fill = resolve_fill(forward, fill)
    results, classes, valid = run_batched(_confidence, forward, images, targets, [maps], [fill], devices)
    return ConfidenceChange(*results, classes, valid)
