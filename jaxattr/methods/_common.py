"""What every method shares: the forward contract, targets, the scored output and its gradient.

A forward is any callable `images -> logits` that treats each image independently (BatchNorm in
inference mode, no batch statistics). Methods take it as a jit argument, so it must be a pytree:
a `jaxattr.Model`, a `Head`, or `jax.tree_util.Partial(apply_fn, params)`; a plain function is
wrapped in a Partial (its closed-over arrays then become compile-time constants).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxattr import paths
from jaxattr.models import Head, Model, check_images
from jaxattr.scores import Output as Output, select_scores

Forward = Callable[[Array], Array]


def as_forward(forward: Forward) -> Forward:
    """`forward` as a pytree callable that can be passed to jit-compiled functions."""
    if isinstance(forward, (Model, Head, jax.tree_util.Partial)):
        return forward
    if not callable(forward):
        raise TypeError(f"expected a model or a callable images -> logits, got {type(forward).__name__}")
    return jax.tree_util.Partial(forward)


def require_model(forward: Forward, method: str, why: str = "reads the model's internals") -> Model:
    """Methods that reach inside the model (sites, taps, guided rules) need a jaxattr Model, not any forward."""
    if not isinstance(forward, Model):
        raise TypeError(f"{method} {why}: pass a jaxattr Model, got {type(forward).__name__}")
    return forward


def check_inputs(images: Array, targets: Array | int | None, *, several_classes: bool = False) -> None:
    """Eager validation at the public boundary (shapes are static, so this costs nothing).
    `several_classes`: targets may also have shape (b, K), K classes per image."""
    check_images(images)
    if images.shape[0] == 0:
        raise ValueError("expected at least one image, got an empty batch")
    if isinstance(targets, bool):
        raise TypeError(f"targets must be integer class indices, got {targets!r}")
    if targets is not None and not isinstance(targets, int):
        shape, b = jnp.shape(targets), images.shape[0]
        if not (shape in ((), (b,)) or (several_classes and len(shape) == 2 and shape[0] == b and shape[1] > 0)):
            allowed = f"({b},)" + (f" or ({b}, K)" if several_classes else "")
            raise ValueError(f"targets must be an int or have shape {allowed}, got {shape}")
        if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            raise TypeError(f"targets must be integer class indices, got dtype {jnp.result_type(targets)}")


# Pixel values further than this outside [0, 1] are refused: they are not images in [0, 1] that
# noise or rounding pushed a little out, but data in another range (0..255, normalised).
VALUE_MARGIN = 1.0


@jax.jit
def _value_summary(images: Array) -> tuple[Array, Array, Array]:
    finite = jnp.isfinite(images)
    low = jnp.min(jnp.where(finite, images, jnp.inf))
    high = jnp.max(jnp.where(finite, images, -jnp.inf))
    return jnp.sum(~finite), low, high


def check_values(images: Array) -> None:
    """Concrete images hold finite values within VALUE_MARGIN of [0, 1] (one reduction; values
    traced inside a transformation are not checked)."""
    if isinstance(images, jax.core.Tracer):
        return
    non_finite, low, high = (np.asarray(v).item() for v in _value_summary(images))
    if non_finite:
        raise ValueError(f"{non_finite} image values are NaN or infinite; images must be finite pixels in [0, 1]")
    if low < -VALUE_MARGIN or high > 1 + VALUE_MARGIN:
        if low >= -VALUE_MARGIN:
            hint = "8-bit pixel data (0..255)? divide it by 255"
        else:
            hint = "normalised images? pass pixels in [0, 1]: models normalise their input themselves"
        raise ValueError(f"images must hold pixels in [0, 1], got values in [{low:g}, {high:g}]; {hint}")


_logits = jax.jit(lambda forward, images: forward(images))


def check_target_range(forward: Forward, images: Array, targets: Array | int | None) -> None:
    """Concrete targets are class indices of the forward's output (its shape from a cached trace)."""
    if targets is None or isinstance(targets, jax.core.Tracer):
        return
    one = jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)
    classes = _logits.eval_shape(forward, one).shape[-1]
    values = np.asarray(targets).ravel()
    outside = values[(values < 0) | (values >= classes)]
    if outside.size:
        raise ValueError(f"targets must be class indices in [0, {classes - 1}], got {outside[0]}")


def check_key(key: jax.Array | None, batch: int) -> None:
    """`key` is None, one jax.random key (typed, or a raw uint32 (2,) key), or a batch of typed keys."""
    if key is None:
        return
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape not in ((), (batch,)):
            raise ValueError(f"key must be one key or one per image, shape ({batch},), got shape {key.shape}")
        return
    if isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,):
        return  # a raw jax.random.PRNGKey
    hint = ": an int is a seed, pass jax.random.key(seed)" if isinstance(key, (int, np.integer)) else ""
    described = f"{type(key).__name__} of shape {key.shape}" if hasattr(key, "shape") else type(key).__name__
    raise TypeError(f"key must be a jax.random key, e.g. jax.random.key(0), got {described}{hint}")


def resolve_targets(forward: Forward, images: Array, targets: Array | int | None) -> Int[Array, " b"]:
    """Per-image class indices; None means each image's predicted class."""
    if targets is None:
        return jnp.argmax(forward(images), axis=-1)
    return jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (images.shape[0],))


def target_scores(
    forward: Forward, images: Array, targets: Int[Array, " b"], output: Output = "logit"
) -> Float[Array, " b"]:
    """The explained quantity per image: the target's logit or softmax probability."""
    return select_scores(forward(images), targets, output)


def input_gradients(
    forward: Forward, images: Array, targets: Int[Array, " b"], output: Output = "logit"
) -> tuple[Float[Array, " b"], Float[Array, "b h w c"]]:
    """(scores, d score_i / d images_i) for a batch in one backward pass.

    The gradient of the summed scores is each image's own gradient because images do not
    interact inside the forward."""
    scores, vjp = jax.vjp(lambda x: target_scores(forward, x, targets, output), images)
    (grads,) = vjp(jnp.ones_like(scores))
    return scores, grads


def image_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per image, keyed by its index: an image draws the same noise whatever the batch
    size, so padding a batch (sharding) or growing it leaves the first images' results alone."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def is_key_batch(key: jax.Array | None, batch: int) -> bool:
    """Whether `key` holds one typed key per image (jax.random.key; a raw uint32 key is one key)."""
    return (
        isinstance(key, jax.Array)
        and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        and key.shape == (batch,)
    )


@jax.jit
def predicted_classes(forward: Forward, images: Array) -> Int[Array, " b"]:
    return jnp.argmax(forward(images), axis=-1)


def path_scores(forward: Forward, targets: Int[Array, " b"], output: Output = "logit") -> Callable[[Array], Array]:
    """The score `jaxattr.paths.integrate` differentiates: image path points (k, b, h, w, c) ->
    each point's target score (k, b), evaluated as one batch of k·b images."""

    def scores(points: Float[Array, "k b h w c"]) -> Float[Array, "k b"]:
        k, b = points.shape[:2]
        flat = points.reshape(k * b, *points.shape[2:])
        return target_scores(forward, flat, jnp.tile(targets, k), output).reshape(k, b)

    return scores


def straight_image_path(
    forward: Forward,
    starts: Float[Array, "b h w c"],
    ends: Float[Array, "b h w c"],
    targets: Int[Array, " b"],
    output: Output = "logit",
) -> tuple[Callable[[Array], Array], paths.StraightLine]:
    """The straight path from the pixel images `starts` to `ends`, and the score to integrate along
    it (`paths.integrate(score, path, rule)` is then Integrated Gradients in pixel units).

    For a jaxattr Model the path lies in the model's normalised space, as captum builds it on
    normalised inputs: its start and direction are the normalisation's value and tangent at the
    starts (`jax.jvp`: normalise(starts) and the exact linear image of ends - starts), the points
    start + t · direction are formed there, and the model runs from them (`from_normalised`). In
    float32 a point near a baseline that normalises to ~0 (the 'mean' baseline) then keeps its
    relative precision; built in pixels, mean + t (x - mean), and normalised inside the model it
    loses ~eps·|mean| / |t (x - mean)| (4.4e-5 at the first of 50 Gauss-Legendre nodes), enough to
    flip near-ties of ReLUs and max-pools on those almost constant images. No conversion back is
    needed: the normalisation is affine per channel, so tangent ⊙ gradient is the same in both
    spaces, (d / std) ⊙ (std ∇_pixels) = d ⊙ ∇_pixels, up to rounding. Any other forward: the
    path in pixel space."""
    if not isinstance(forward, Model):
        return path_scores(forward, targets, output), paths.StraightLine(starts, ends)
    start, direction = jax.jvp(forward.normalise, (starts,), (ends - starts,))
    path = paths.StraightLine(start, forward.normalise(ends), direction)
    return path_scores(forward.from_normalised, targets, output), path
