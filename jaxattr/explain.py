"""`explain`: any registered method by name, with targets, scores and display-ready heatmaps."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxattr.methods._common import as_forward, check_inputs, is_key_batch
from jaxattr.methods.registry import method_info
from jaxattr.resize import resize
from jaxattr.sharding import data_parallel


@jax.tree_util.register_dataclass  # a pytree, so sharded runs can slice every field at once
@dataclasses.dataclass(frozen=True)
class Explanation:
    attributions: Array  # the method's raw output, batch first
    heatmaps: Float[Array, "b h w"]  # in [0, 1] at the images' resolution
    targets: Int[Array, " b"]
    probabilities: Float[Array, " b"]  # softmax probability of each target


@jax.jit
def _predict(forward, images):
    probabilities = jax.nn.softmax(forward(images), axis=-1)
    return jnp.argmax(probabilities, axis=-1), probabilities


def method_config(method: str, config: Any = None, **overrides: Any) -> Any:
    """The method's config: `config` (default: the reference's defaults) with `overrides` applied."""
    info = method_info(method)
    config = info.config() if config is None else config
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(
            f"{method} has no option {', '.join(sorted(unknown))}; "
            f"options: {', '.join(f.name for f in dataclasses.fields(config))}"
        )
    return dataclasses.replace(config, **overrides)


def explain(
    model,
    images: Float[Array, "b h w 3"],
    method: str = "saliency",
    *,
    targets: Int[Array, " b"] | int | None = None,
    key: jax.Array | None = None,
    config: Any = None,
    devices: Sequence[jax.Device] | None = None,
    baselines: Float[Array, "*f"] | None = None,
    **overrides: Any,
) -> Explanation:
    """Explain each image's target class (default: the predicted class) with `method`.

    `config` is the method's config dataclass; keyword overrides replace single fields,
    e.g. explain(model, x, "integrated_gradients", steps=32).

    `devices` (e.g. jax.local_devices()) runs data parallel: the batch is split over the devices,
    the parameters replicated; the results equal a single-device run (`jaxattr.sharding`).

    `baselines` (path methods: integrated_gradients, gnl_ig, guided_ig) replaces the config's
    named baseline by an array broadcastable to the images: one per image, one image, a colour."""
    info = method_info(method)
    if baselines is not None and "baselines" not in inspect.signature(info.fn).parameters:
        raise ValueError(f"{method} takes no baselines")
    if devices is not None:
        batch = jnp.shape(images)[0]
        per_image = {"key": key} if is_key_batch(key, batch) else {}
        if baselines is not None and jnp.ndim(baselines) == jnp.ndim(images) and jnp.shape(baselines)[0] == batch:
            per_image["baselines"] = baselines
        def run(m, x, t, *arrays):  # each device's slice of the per-image arrays replaces the whole
            named = {"key": key, "baselines": baselines, **dict(zip(per_image, arrays))}
            return explain(m, x, method, targets=t, config=config, **named, **overrides)

        return data_parallel(run, model, images, targets, per_image=list(per_image.values()), devices=devices)
    config = method_config(method, config, **overrides)
    check_inputs(images, targets)
    if info.stochastic and key is None:
        raise ValueError(f"{method} is stochastic: pass key=jax.random.key(seed)")
    forward = as_forward(model)
    predicted, probabilities = _predict(forward, images)
    targets = predicted if targets is None else jnp.broadcast_to(jnp.asarray(targets, jnp.int32), predicted.shape)
    arrays = {} if baselines is None else {"baselines": baselines}
    attributions = info.fn(model, images, targets, config=config, key=key, **arrays)
    maps = info.heatmap(attributions)
    if maps.shape[1:3] != images.shape[1:3]:
        maps = resize(maps, images.shape[1:3], "bilinear")
    target_probabilities = jnp.take_along_axis(probabilities, targets[:, None], axis=-1)[:, 0]
    return Explanation(attributions, maps, targets, target_probabilities)
