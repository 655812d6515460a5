"""What every method shares: the forward contract, targets, the scored output and its gradient.

A forward is any callable `images -> logits` that treats each image independently (BatchNorm in
inference mode, no batch statistics). Methods take it as a jit argument, so it must be a pytree:
a `jaxattr.Model`, a `Head`, or `jax.tree_util.Partial(apply_fn, params)`; a plain function is
wrapped in a Partial (its closed-over arrays then become compile-time constants).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxattr.models import Head, Model, check_images
from jaxattr.scores import OUTPUTS as OUTPUTS, Output as Output, select_scores

Forward = Callable[[Array], Array]


def as_forward(forward: Forward) -> Forward:
    """`forward` as a pytree callable that can be passed to jit-compiled functions."""
    if isinstance(forward, (Model, Head, jax.tree_util.Partial)):
        return forward
    if not callable(forward):
        raise TypeError(f"expected a model or a callable images -> logits, got {type(forward).__name__}")
    return jax.tree_util.Partial(forward)


def require_model(forward: Forward, method: str) -> Model:
    """Methods that tap layers or switch non-linearities need a jaxattr Model, not any forward."""
    if not isinstance(forward, Model):
        raise TypeError(f"{method} needs a jaxattr Model, got {type(forward).__name__}")
    return forward


def check_inputs(images: Array, targets: Array | int | None) -> None:
    """Eager validation at the public boundary (shapes are static, so this costs nothing)."""
    check_images(images)
    if targets is not None and not isinstance(targets, int):
        shape = jnp.shape(targets)
        if shape not in ((), (images.shape[0],)):
            raise ValueError(f"targets must be an int or have shape ({images.shape[0]},), got {shape}")
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
def _predicted_classes(forward: Forward, images: Array) -> Int[Array, " b"]:
    return jnp.argmax(forward(images), axis=-1)


def attribution_method(config_cls: type):
    """Decorator turning an implementation `fn(forward, images, targets, key, *, config)` into the
    public method `method(forward, images, targets=None, *, config=config_cls(), key=None)`.

    The implementation is jit-compiled with the (frozen, hashable) config static; targets may be
    None (predicted class, resolved inside the compiled function). Array inputs that cannot live
    in a static config (a baseline array, explicit noise) are extra keyword arguments of `fn`,
    passed through unchanged.

    `key` is one key for the batch (each image then draws from fold_in(key, its index)) or one
    typed key per image, shape (b,): each image is then computed from its own key alone, so its
    map does not depend on which batch it came in (the CLI keys images by file name)."""

    def wrap(fn):
        compiled = jax.jit(fn, static_argnames=("config",))

        @functools.wraps(fn)
        def method(forward, images, targets=None, *, config=None, key=None, **arrays):
            check_inputs(images, targets)
            config = config_cls() if config is None else config
            if not isinstance(config, config_cls):
                raise TypeError(f"{fn.__name__} takes a {config_cls.__name__}, got {type(config).__name__}")
            forward = as_forward(forward)
            if not is_key_batch(key, images.shape[0]):
                return compiled(forward, images, targets, key, config=config, **arrays)
            if arrays:
                raise ValueError(f"per-image keys cannot be combined with {', '.join(arrays)}: pass one key")
            targets = _predicted_classes(forward, images) if targets is None else targets
            targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), images.shape[:1])
            one = lambda x, t, k: compiled(forward, x[None], t[None], k, config=config)[0]
            return jax.vmap(one)(images, targets, key)

        method.config_class = config_cls
        return method

    return wrap
