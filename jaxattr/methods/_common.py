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
from jaxtyping import Array, Float, Int

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
    if targets is not None and not isinstance(targets, int):
        shape, b = jnp.shape(targets), images.shape[0]
        if not (shape in ((), (b,)) or (several_classes and len(shape) == 2 and shape[0] == b and shape[1] > 0)):
            allowed = f"({b},)" + (f" or ({b}, K)" if several_classes else "")
            raise ValueError(f"targets must be an int or have shape {allowed}, got {shape}")
        if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            raise TypeError(f"targets must be integer class indices, got dtype {jnp.result_type(targets)}")


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
