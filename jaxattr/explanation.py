"""`explain`: any method, by name or as a value, with targets, probabilities and saliency maps."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxattr.config import Config
from jaxattr.maps import upsample
from jaxattr.methods._common import as_forward, is_key_batch
from jaxattr.methods.base import Method, check_call, method_spec
from jaxattr.sharding import data_parallel


@jax.tree_util.register_dataclass  # a pytree, so sharded runs can slice every field at once
@dataclasses.dataclass(frozen=True)
class Explanation:
    attributions: Array  # the method's raw output, batch first
    # The method's saliency map at the images' resolution, unclipped (what metrics rank); display
    # contrast is applied only when drawing (jaxattr.viz.contrast with the method's Contrast).
    # With K classes per image (targets (b, K) or top_k=K) every field gains a class axis after
    # the batch axis: attributions (b, K, ...), maps (b, K, h, w), targets and probabilities (b, K).
    maps: Float[Array, "b *k h w"]
    targets: Int[Array, "b *k"]
    probabilities: Float[Array, "b *k"]  # softmax probability of each target
    # The method's other outputs by name, batch first (MethodSpec.extras; e.g. I-GOS's masks).
    extras: dict[str, Array] = dataclasses.field(default_factory=dict)


@jax.jit
def _predict(forward, images):
    probabilities = jax.nn.softmax(forward(images), axis=-1)
    return jnp.argmax(probabilities, axis=-1), probabilities


def method_config(method: str, config: Config | None = None, **overrides: Any) -> Config:
    """The method's config: `config` (default: the reference's defaults) with `overrides` applied."""
    return method_spec(method).build(config, **overrides).config


def explain(
    model,
    images: Float[Array, "b h w 3"],
    method: str | Method = "saliency",
    *,
    targets: Int[Array, " b"] | Int[Array, "b k"] | int | None = None,
    top_k: int | None = None,
    key: jax.Array | None = None,
    config: Config | None = None,
    devices: Sequence[jax.Device] | None = None,
    baselines: Float[Array, "*f"] | None = None,
    references: Float[Array, "*r h w 3"] | None = None,
    **overrides: Any,
) -> Explanation:
    """Explain each image's target class (default: the predicted class) with `method`.

    `method` is a registered name, with `config` (its config class) and keyword overrides of single
    fields, e.g. explain(model, x, "integrated_gradients", steps=32); or a method bound to its
    config (`jaxattr.method(...)`, e.g. SmoothGrad around IG).

    `devices` (e.g. jax.local_devices()) runs data parallel: the batch is split over the devices,
    the parameters replicated; the results equal a single-device run (`jaxattr.sharding`).

    `baselines` (methods that take them: integrated_gradients, gnl_ig, guided_ig) replaces the
    config's named baseline by an array broadcastable to the images: one per image, one image, a
    colour.

    `references` (methods that take them: ig2) are reference images, one set (r, h, w, 3) for all
    images or one per image (b, r, h, w, 3).

    Several classes per image in one compiled call: `targets` of shape (b, K) (listed classes), or
    `top_k=K` (each image's K most probable classes, most probable first); see `Explanation`."""
    if isinstance(method, Method):
        if config is not None or overrides:
            raise ValueError("a bound method carries its config: pass config/overrides to jaxattr.method() instead")
        bound = method
    else:
        bound = method_spec(method).build(config, **overrides)
    spec = bound.spec
    if baselines is not None and not spec.takes_baselines:
        raise ValueError(f"{spec.name} takes no baselines")
    if references is not None and not spec.takes_references:
        raise ValueError(f"{spec.name} takes no references")
    if bound.stochastic and key is None:
        randomness = "is stochastic" if spec.stochastic else "draws random numbers with these settings"
        raise ValueError(f"{spec.name} {randomness}: pass key=jax.random.key(seed)")
    forward = as_forward(model)
    check_call(forward, images, targets, key, several_classes=True)
    if devices is not None:
        batch = jnp.shape(images)[0]
        per_image = {"key": key} if is_key_batch(key, batch) else {}
        if baselines is not None and jnp.ndim(baselines) == jnp.ndim(images) and jnp.shape(baselines)[0] == batch:
            per_image["baselines"] = baselines
        if references is not None and jnp.ndim(references) == jnp.ndim(images) + 1:
            per_image["references"] = references

        def run(m, x, t, *arrays):  # each device's slice of the per-image arrays replaces the whole
            named = {"key": key, "baselines": baselines, "references": references, **dict(zip(per_image, arrays))}
            return explain(m, x, bound, targets=t, top_k=top_k, **named)

        return data_parallel(run, model, images, targets, per_image=list(per_image.values()), devices=devices)
    if top_k is not None and (targets is not None or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int and excludes targets, got top_k={top_k!r}, targets={targets!r}")
    predicted, probabilities = _predict(forward, images)
    if top_k is not None:
        if top_k > probabilities.shape[-1]:
            raise ValueError(f"top_k={top_k} exceeds the model's {probabilities.shape[-1]} classes")
        targets = jax.lax.top_k(probabilities, top_k)[1]
    elif targets is None:
        targets = predicted
    elif jnp.ndim(targets) < 2:
        targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), predicted.shape)
    targets = jnp.asarray(targets, jnp.int32)
    arrays = {name: a for name, a in (("baselines", baselines), ("references", references)) if a is not None}
    if targets.ndim == 2:  # several classes: the attributions alone (a method without them says so)
        attributions, extras = bound(model, images, targets, key=key, **arrays), {}
    else:
        attributions, extras = bound.with_extras(model, images, targets, key=key, **arrays)
    leading = targets.shape  # (b,) or (b, K): the map reductions take one flat batch axis
    flat = attributions.reshape(-1, *attributions.shape[len(leading) :])
    maps = upsample(spec.saliency(flat), images.shape[1:3], spec.upsample).reshape(*leading, *images.shape[1:3])
    target_probabilities = jnp.take_along_axis(probabilities, targets.reshape(len(targets), -1), axis=-1)
    target_probabilities = target_probabilities.reshape(leading)
    return Explanation(attributions, maps, targets, target_probabilities, extras)
