"""What every faithfulness metric shares: the forward and its classes, the fill colour, checked maps,
pixel ranks, curves evaluated a chunk of points at a time, and sharding over devices.

A curve is a sequence of perturbed versions of each image, one per curve point, each read out by
the model (e.g. the softmax probability of one class). All points of all images are independent, so
they are built and scored on the device: `vmap` over the images inside one point,
`lax.map(batch_size=chunk)` over the points. Only one chunk of perturbed images is alive at a time,
so memory follows `chunk` (points per forward pass; each pass scores chunk x batch images), never
the length of the curve.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxattr.methods._common import Forward, as_forward, check_inputs
from jaxattr.models import Model
from jaxattr.resize import resize
from jaxattr.scores import select_scores
from jaxattr.sharding import data_parallel

# Curve points per forward pass unless the caller says otherwise: 16 x batch images per pass.
DEFAULT_CHUNK = 16

# ------------------------------------------------------------------------------ host side: inputs


def mean_colour(model: Any) -> np.ndarray:
    """The pixel colour a jaxattr model normalises to zero: its per-channel mean, float32 (3,).

    "Zero in normalised space" of the references (RISE's deletion substrate and blur padding,
    BEE's removed pixels) is this colour in jaxattr's pixel space."""
    if not isinstance(model, Model):
        raise TypeError(
            f"cannot read the normalisation mean of a {type(model).__name__}; pass fill= explicitly "
            "(an RGB colour in [0, 1]: the colour the model maps to 0)"
        )
    return np.asarray(model.mean, np.float32)


def resolve_fill(forward: Forward, fill: Any) -> Float[Array, "3"]:
    """`fill` as a float32 RGB colour; None means the model's mean colour (jaxattr Models only)."""
    colour = mean_colour(forward) if fill is None else np.asarray(fill, np.float32)
    if colour.shape not in ((), (3,)) or not np.isfinite(colour).all():
        raise ValueError(f"fill must be one finite value or an RGB triple, got {fill!r}")
    return jnp.broadcast_to(jnp.asarray(colour), (3,))


def check_maps(maps: Any, images: Array, *, name: str = "maps", resize_to_images: bool = True) -> Array:
    """Saliency maps (b, h, w) for `images` (b, H, W, 3) as a float array. A map of another size is
    resized bilinearly to the images' size, with a warning (unless `resize_to_images` is False: I-GOS
    masks are low resolution by design)."""
    maps = jnp.asarray(maps)
    if maps.ndim != 3:
        hint = "; reduce the channels first, e.g. jaxattr.maps.abs_sum, or use Explanation.maps" if maps.ndim == 4 else ""
        raise ValueError(f"{name} must have shape (batch, height, width), got {maps.shape}{hint}")
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"got {maps.shape[0]} {name} for {images.shape[0]} images")
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(images.dtype)
    if resize_to_images and maps.shape[1:] != images.shape[1:3]:
        warnings.warn(
            f"{name} are {maps.shape[1]}x{maps.shape[2]}, the images {images.shape[1]}x{images.shape[2]}: "
            "resizing the maps (bilinear) to the images' size",
            stacklevel=3,
        )
        maps = resize(maps, images.shape[1:3], "bilinear")
    return maps


def _finite_rows(x: Array) -> Bool[Array, " b"]:
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def valid_rows(images: Array, maps: Array) -> tuple[Bool[Array, " b"], Array]:
    """(valid, maps): a row is valid when its map and its image are finite. Invalid maps are
    replaced by zeros so that the batch runs on; callers return NaN scores for those rows."""
    valid = _finite_rows(maps) & _finite_rows(images)
    return valid, jnp.where(valid[:, None, None], maps, jnp.zeros_like(maps))


def invalid_to_nan(valid: Bool[Array, " b"], tree: Any) -> Any:
    """Every floating per-image leaf of `tree` (leading axis b) set to NaN on the invalid rows."""

    def mask(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return jnp.where(valid.reshape(-1, *([1] * (leaf.ndim - 1))), leaf, jnp.nan)

    return jax.tree_util.tree_map(mask, tree)


def safe_ratio(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0 (no 0/0 NaN)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.zeros_like(num))


def min_max(maps: Float[Array, "b h w"]) -> Float[Array, "b h w"]:
    """Each map scaled to [0, 1] by (m - min) / (max - min) with a true division per pixel, as the
    references compute it (a constant map gives 0). XLA would otherwise rewrite the division by a
    broadcast scalar as a multiplication by its reciprocal, off by an ulp on some pixels, which
    splits or merges ties that rank-based scores (average precision) count."""
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    span = jnp.max(maps, axis=(1, 2), keepdims=True) - lo
    varies = span > 0
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(varies, span, 1), maps.shape))
    return jnp.where(varies, (maps - lo) / divisor, 0)


# ------------------------------------------------------------------------------------ pixel order


def ranks_from_order(order: Int[Array, "b n"]) -> Int[Array, "b n"]:
    """The inverse permutation of each row: rank[order[j]] = j."""
    positions = jnp.broadcast_to(jnp.arange(order.shape[1], dtype=jnp.int32), order.shape)
    return jax.vmap(lambda o, p: jnp.zeros_like(p).at[o].set(p))(order, positions)


def descending_ranks(maps: Float[Array, "b h w"]) -> Int[Array, "b h w"]:
    """Each pixel's position when the map is sorted by descending value (0: the most salient).

    The order is the reverse of a stable ascending argsort of the row-major flattened map, so tied
    pixels go highest flat index first. This is the deterministic analogue of RISE's
    np.flip(np.argsort(map)): NumPy's default argsort is an unstable introsort whose tie order is
    an accident of the implementation (metrics.md §7); on tie-free maps the two orders agree."""
    b, h, w = maps.shape
    order = jnp.argsort(maps.reshape(b, h * w), axis=1, stable=True)[:, ::-1]
    return ranks_from_order(order).reshape(b, h, w)


def ascending_ranks(masks: Float[Array, "b h w"]) -> Int[Array, "b h w"]:
    """Each cell's position in a stable ascending sort of the flattened mask (ties: lower index first)."""
    b, h, w = masks.shape
    order = jnp.argsort(masks.reshape(b, h * w), axis=1, stable=True)
    return ranks_from_order(order).reshape(b, h, w)


# ------------------------------------------------------------------------------ scoring curves


def classes_of(forward: Forward, images: Array, targets: Array | int | None) -> Int[Array, " b"]:
    """`targets` broadcast to one class per image, or the argmax class of the clean images."""
    if targets is None:
        return jnp.argmax(forward(images), axis=-1).astype(jnp.int32)
    return jnp.broadcast_to(jnp.asarray(targets, jnp.int32), images.shape[:1])


def probabilities(logits: Float[Array, "b k"], classes: Int[Array, " b"]) -> Float[Array, " b"]:
    """Softmax probability of each image's class."""
    return select_scores(logits, classes, "probability")


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of curve points per pass, or None; got {chunk!r}")


def map_points(fn: Callable[[Array], Any], points: Array, chunk: int | None) -> Any:
    """fn over the leading axis of `points`, results stacked, `chunk` points per vmapped call.

    A single call without a loop when one chunk holds every point (XLA:CPU runs convolutions inside
    loop bodies slower, jax-ml/jax#12868); otherwise `lax.map(batch_size=chunk)`, whose remainder is
    one smaller call, so nothing is padded."""
    if chunk is None or chunk >= points.shape[0]:
        return jax.vmap(fn)(points)
    return jax.lax.map(fn, points, batch_size=int(chunk))


def curve(
    forward: Forward,
    perturb: Callable[[Array], Array],
    points: Array,
    chunk: int | None,
    readout: Callable[[Array], Any],
) -> Any:
    """readout(forward(perturb(point))) for every point: perturb(point) -> images (b, h, w, 3),
    readout(logits) -> a pytree of per-image arrays (b,). Leaves come back as (b, points)."""
    values = map_points(lambda point: readout(forward(perturb(point))), points, chunk)
    return jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf, 0, 1), values)


# ------------------------------------------------------------------------------------ API frame


def run_batched(
    core: Callable[..., Any],
    forward: Forward,
    images: Array,
    targets: Array | int | None,
    per_image: Sequence[Array],
    shared: Sequence[Any],
    devices: Sequence[jax.Device] | None,
) -> Any:
    """core(forward, images, targets, *per_image, *shared), data parallel over `devices` when given:
    the images, the targets and the `per_image` arrays (leading axis b) are split over the devices,
    the forward and the `shared` arguments replicated. The result equals the single-device one."""
    check_inputs(images, targets)
    forward = as_forward(forward)
    if devices is None:
        return core(forward, images, targets, *per_image, *shared)
    run = lambda f, x, t, *rows: core(f, x, t, *rows, *shared)
    return data_parallel(run, forward, images, targets, per_image=list(per_image), devices=devices)
