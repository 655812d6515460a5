"""Deletion and insertion games in the two conventions of the seed papers (metrics.md §1-3).

Both remove (deletion) or reveal (insertion) the most salient parts of an image first and follow the
softmax probability of the clean image's predicted class; a faithful map makes the deletion curve
fall fast (low AUC) and the insertion curve rise fast (high AUC). The conventions differ in every
detail, so their numbers are not comparable and they have separate names:

* RISE (`rise_deletion`, `rise_insertion`; Petsiuk et al. 2018, `evaluation.py`, also used by GNL
  and IG2): single pixels of the full-resolution map, `step` pixels per curve point; deletion fills
  with the model's mean colour (zero in normalised space), insertion starts from RISE's blur;
  AUC = trapezoid over equal intervals.
* I-GOS (`igos_deletion`, `igos_insertion`; `methods_helper.py` of IGOS_pp): cells of the low
  resolution mask (low = salient), s^2 // 50 cells per point, cell edges made soft by the method's
  align_corners upsampler, the blurred baseline as substrate; summary = cell-weighted right-Riemann
  sum (the reference's last-chunk bug fixed, its value still available).

Curve point i of image b is the model's readout on an image built directly from its rank map:
where(rank < removed(i), finish, start). Points are independent, built and scored a chunk at a time
on the device (`_common.curve`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxattr.blur import blur_matrix
from jaxattr.metrics._common import (
    DEFAULT_CHUNK,
    ascending_ranks,
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
from jaxattr.resize import resize

Game = Literal["deletion", "insertion"]

# ------------------------------------------------------------------------------------ results


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RiseCurves:
    """A RISE deletion or insertion game on a batch. Invalid rows (NaN/inf map or image) hold NaN."""

    scores: Float[Array, "b n"]  # p_c at each point: the start image, ..., the fully substituted one
    auc: Float[Array, " b"]  # trapezoid on [0, 1] with equal intervals; the AUC of a mean curve is the mean AUC
    fractions: Float[Array, " n"]  # x of each point, i / (n - 1) as RISE plots it (the last step may be partial)
    classes: Int[Array, " b"]  # c: the clean image's argmax unless targets were given
    valid: Bool[Array, " b"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IgosCurves:
    """An I-GOS deletion or insertion game on a batch. Invalid rows hold NaN."""

    scores: Float[Array, "b n"]  # p_c before any cell is changed, then after each chunk of cells
    fractions: Float[Array, " n"]  # the true fraction of cells changed at each point (last: 1)
    score: Float[Array, " b"]  # sum_j n_j p_j / cells: right-Riemann sum over the fraction changed (fixed)
    auc_plot: Float[Array, " b"]  # the reference's plot AUC: trapezoid divided by the number of points
    reference_score: Float[Array, " b"]  # the reference's logged value, last-chunk bug included
    classes: Int[Array, " b"]
    valid: Bool[Array, " b"]


# ------------------------------------------------------------------------------- RISE convention

# RISE's step presets: its single-image run (`Evaluation.ipynb` cell 8, GNL) changes 224 pixels per
# point (224 steps, 225 points at 224^2); its batched evaluation (cell 20) 224 * 8 (28 steps, 29 points).
RISE_STEPS: dict[str, int] = {"single": 224, "batched": 224 * 8}

# RISE's insertion substrate: an 11x11 kernel, SciPy's gaussian_filter of a delta with sigma 5 and its
# defaults (mode 'reflect', truncate 4) -- far flatter than a Gaussian, as the 20 px tails fold back.
RISE_BLUR_SIZE = 11
RISE_BLUR_SIGMA = 5.0


def rise_kernel() -> np.ndarray:
    """RISE's 1-D blur kernel k1 (float64, 11 taps, sums to 1); the 2-D kernel is outer(k1, k1).

    SciPy's gaussian_filter1d of an 11-sample delta: column 5 of the reflect-mode blur matrix."""
    return blur_matrix(RISE_BLUR_SIZE, RISE_BLUR_SIGMA, mode="reflect")[:, RISE_BLUR_SIZE // 2]


def _correlate(x: Array, kernel: np.ndarray, axis: int) -> Array:
    """'same' correlation of `x` with an odd-length kernel along `axis`, zero padded: a weighted sum
    of shifted slices (elementwise work, fast on every backend; a 224 x 224 blur matrix would cost
    20x the arithmetic)."""
    radius = len(kernel) // 2
    padding = [(0, 0)] * x.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(x, padding)
    size = x.shape[axis]
    taps = [jax.lax.slice_in_dim(padded, t, t + size, axis=axis) for t in range(len(kernel))]
    return sum(jnp.asarray(k, x.dtype) * tap for k, tap in zip(kernel, taps))


def rise_blur(images: Float[Array, "b h w 3"], fill: Float[Array, "3"]) -> Float[Array, "b h w 3"]:
    """RISE's insertion start: each channel convolved with outer(k1, k1), zero padding 5 in the
    model's normalised space, i.e. padding with the mean colour `fill` in pixel space (k sums to 1,
    so the blur commutes with the affine normalisation). Separable: rows, then columns. Channels
    never mix."""
    kernel = rise_kernel()
    fill = jnp.asarray(fill, images.dtype)
    return _correlate(_correlate(images - fill, kernel, 1), kernel, 2) + fill


def rise_step(step: int | str, pixels: int) -> int:
    """A step preset name or a positive pixel count, checked."""
    if isinstance(step, str):
        if step not in RISE_STEPS:
            raise ValueError(f"unknown step preset {step!r}; presets: {', '.join(RISE_STEPS)} (or a pixel count)")
        step = RISE_STEPS[step]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a positive number of pixels or a preset name, got {step!r}")
    return min(int(step), pixels)


def rise_points(height: int, width: int, step: int) -> int:
    """n + 1 curve points for n = ceil(h * w / step) steps."""
    return -(-height * width // step) + 1


def trapezoid_auc(scores: Float[Array, "b n"]) -> Float[Array, " b"]:
    """RISE's AUC: (sum a - a_0 / 2 - a_last / 2) / (n - 1), the trapezoid on [0, 1]."""
    return (jnp.sum(scores, axis=1) - (scores[:, 0] + scores[:, -1]) / 2) / (scores.shape[1] - 1)


@functools.partial(jax.jit, static_argnames=("game", "step", "chunk"))
def _rise(forward, images, targets, maps, fill, *, game: Game, step: int, chunk: int | None):
    valid, maps = valid_rows(images, maps)
    classes = classes_of(forward, images, targets)
    ranks = descending_ranks(maps)[..., None]
    fill = jnp.asarray(fill, images.dtype)
    if game == "deletion":
        start, finish = images, jnp.broadcast_to(fill, images.shape)
    else:
        start, finish = rise_blur(images, fill), images
    points = jnp.arange(rise_points(*images.shape[1:3], step), dtype=jnp.int32)
    scores = curve(
        forward,
        lambda i: jnp.where(ranks < step * i, finish, start),
        points,
        chunk,
        lambda logits: probabilities(logits, classes),
    )
    return invalid_to_nan(valid, (scores, trapezoid_auc(scores))), classes, valid


def _rise_game(game, forward, images, maps, targets, fill, step, chunk, devices) -> RiseCurves:
    images = jnp.asarray(images)
    maps = check_maps(maps, images)
    check_chunk(chunk)
    step = rise_step(step, images.shape[1] * images.shape[2])
    fill = resolve_fill(forward, fill)
    core = functools.partial(_rise, game=game, step=step, chunk=chunk)
    (scores, auc), classes, valid = run_batched(core, forward, images, targets, [maps], [fill], devices)
    n = scores.shape[1] - 1
    return RiseCurves(scores, auc, jnp.arange(n + 1, dtype=scores.dtype) / n, classes, valid)


def rise_deletion(
    forward: Any,
    images: Float[Array, "b h w 3"],
    maps: Float[Array, "b h w"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    fill: Float[Array, "3"] | None = None,
    step: int | str = "single",
    chunk: int | None = DEFAULT_CHUNK,
    devices: Sequence[jax.Device] | None = None,
) -> RiseCurves:
    """RISE's deletion game (metrics.md §1): pixels replaced by `fill`, most salient first.

    forward: a jaxattr Model or any pytree callable images -> logits. images: NHWC in [0, 1].
    maps: saliency (b, h, w), high = salient; another size is resized to the images with a warning;
      a map or image with NaN/inf gives that row NaN scores and valid=False, the rest run on.
      Order: descending value, ties highest flat index first (`descending_ranks`).
    targets: the scored class c; None (RISE) = the argmax on the clean image.
    fill: the substituted colour; None = the model's mean colour (zero in normalised space).
    step: pixels per point, or a preset of `RISE_STEPS` ('single' 224, 'batched' 1792).
    chunk: curve points per forward pass (each pass scores chunk x batch images); memory follows it.
    devices: run data parallel over these devices (equal to the single-device result)."""
    return _rise_game("deletion", forward, images, maps, targets, fill, step, chunk, devices)


def rise_insertion(
    forward: Any,
    images: Float[Array, "b h w 3"],
    maps: Float[Array, "b h w"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    fill: Float[Array, "3"] | None = None,
    step: int | str = "single",
    chunk: int | None = DEFAULT_CHUNK,
    devices: Sequence[jax.Device] | None = None,
) -> RiseCurves:
    """RISE's insertion game (metrics.md §1): from `rise_blur(images, fill)` the original pixels are
    put back, most salient first. Arguments as `rise_deletion`; `fill` is the blur's padding colour."""
    return _rise_game("insertion", forward, images, maps, targets, fill, step, chunk, devices)


# ------------------------------------------------------------------------------ I-GOS convention


def igos_counts(cells: int) -> np.ndarray:
    """Cells changed before each curve point: 0, step, 2 step, ..., cells with step = max(1, cells // 50)
    (IGOS_pp `metric`); for 28 x 28 masks 54 points, the last chunk holding 4 cells."""
    step = max(1, cells // 50)
    return np.minimum(np.arange(-(-cells // step) + 1) * step, cells)


@functools.partial(jax.jit, static_argnames=("game", "chunk"))
def _igos(forward, images, targets, masks, baselines, *, game: Game, chunk: int | None):
    valid, masks = valid_rows(images, masks)
    valid = valid & jnp.all(jnp.isfinite(jnp.broadcast_to(baselines, images.shape)), axis=(1, 2, 3))
    classes = classes_of(forward, images, targets)
    ranks = ascending_ranks(masks)
    cells = masks.shape[1] * masks.shape[2]
    counts = igos_counts(cells)
    baselines = jnp.asarray(baselines, images.dtype)
    shown, hidden = (images, baselines) if game == "deletion" else (baselines, images)

    def perturb(count):
        # The keep-mask (1: cell untouched) upsampled like the method's masks: soft cell edges.
        keep = (ranks >= count).astype(images.dtype)
        up = resize(keep, images.shape[1:3], "bilinear", align_corners=True)[..., None]
        return shown * up + hidden * (1 - up)  # phi(X, Y, U) = X U + Y (1 - U), in that order

    scores = curve(forward, perturb, jnp.asarray(counts, jnp.int32), chunk, lambda z: probabilities(z, classes))
    changed = np.diff(counts)  # n_j: cells per chunk
    score = jnp.sum(scores[:, 1:] * jnp.asarray(changed / cells, scores.dtype), axis=1)
    auc_plot = (jnp.sum(scores, axis=1) - (scores[:, 0] + scores[:, -1]) / 2) / scores.shape[1]
    # IGOS_pp adds the constant n_last instead of n_last * p_last (an operator-precedence slip).
    reference = score + (changed[-1] - changed[-1] * scores[:, -1]) / cells
    return invalid_to_nan(valid, (scores, score, auc_plot, reference)), classes, valid


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return jnp.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _igos_game(game, forward, images, masks, baselines, targets, chunk, devices) -> IgosCurves:
    images = jnp.asarray(images)
    masks = check_maps(masks, images, name="masks", resize_to_images=False)
    check_chunk(chunk)
    baselines = jnp.asarray(baselines, images.dtype)
    if not _broadcasts(baselines.shape, images.shape):
        raise ValueError(f"baselines of shape {baselines.shape} do not broadcast to the images {images.shape}")
    # One baseline per image travels with its image when the batch is split over devices.
    one_per_image = baselines.ndim == 4 and baselines.shape[0] == images.shape[0] > 1
    rows, shared = ([masks, baselines], []) if one_per_image else ([masks], [baselines])
    core = functools.partial(_igos, game=game, chunk=chunk)
    (scores, score, auc_plot, reference), classes, valid = run_batched(
        core, forward, images, targets, rows, shared, devices
    )
    counts = igos_counts(masks.shape[1] * masks.shape[2])
    fractions = jnp.asarray(counts / counts[-1], scores.dtype)
    return IgosCurves(scores, fractions, score, auc_plot, reference, classes, valid)


def igos_deletion(
    forward: Any,
    images: Float[Array, "b h w 3"],
    masks: Float[Array, "b s t"],
    baselines: Float[Array, "*b h w 3"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    devices: Sequence[jax.Device] | None = None,
) -> IgosCurves:
    """I-GOS's deletion metric (metrics.md §2): cells of the mask grid, lowest mask value (most
    salient) first, a stable sort; a binary keep-mask upsampled with align_corners bilinear blends
    image (kept) and baseline (removed): phi(I, B, up(keep)).

    masks: I-GOS masks (b, s, t), LOW = salient (negate a high-is-salient map); no noise.
    baselines: the substrate, broadcastable to the images: I-GOS's blurred baseline (igos.md §3).
    targets: the scored class; None = the clean image's argmax.
    The curve has ceil(cells / step) + 1 points, step = max(1, cells // 50); `score` is the fixed
    cell-weighted sum, `reference_score` = score + (n_last - n_last p_last) / cells, what IGOS_pp logs.
    chunk, devices: as `rise_deletion`."""
    return _igos_game("deletion", forward, images, masks, baselines, targets, chunk, devices)


def igos_insertion(
    forward: Any,
    images: Float[Array, "b h w 3"],
    masks: Float[Array, "b s t"],
    baselines: Float[Array, "*b h w 3"],
    targets: Int[Array, " b"] | int | None = None,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    devices: Sequence[jax.Device] | None = None,
) -> IgosCurves:
    """I-GOS's insertion metric: as `igos_deletion` with the roles swapped, phi(B, I, up(keep)):
    the curve starts on the baseline and the most salient cells show the image first."""
    return _igos_game("insertion", forward, images, masks, baselines, targets, chunk, devices)
