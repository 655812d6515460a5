"""`Model`: a Flax classifier bound to its parameters, as a pytree.

Parameters are the pytree's data and the module is static, so a `Model` is an ordinary argument
of jit-compiled methods (no retrace per call, no parameters baked into the program) and methods
only ever see a callable `images -> logits` plus, where they need internals, `tap`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr.models._classifier import Classifier
from jaxattr.nn import check_nonlinearity

Params = Any


def check_images(images: Any) -> None:
    """Shape and dtype contract of every model and method: NHWC, 3 channels, floating point."""
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"expected a batch of images with shape (batch, height, width, 3), got shape {shape}; "
            "add a batch axis with images[None] for a single image"
        )
    if shape[-1] != 3:
        hint = " (this looks like NCHW: use images.transpose(0, 2, 3, 1))" if shape[1] == 3 else ""
        raise ValueError(f"expected NHWC images with 3 channels last, got shape {shape}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"expected floating-point images in [0, 1], got dtype {dtype}")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["module", "name"]
)
@dataclasses.dataclass(frozen=True)
class Model:
    """A classifier: `model(images) -> logits` for NHWC images in [0, 1]."""

    module: Classifier
    params: Params
    name: str = ""

    def __call__(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b k"]:
        check_images(images)
        return self.module.apply({"params": self.params}, images)

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the tappable layers, in execution order (torch module names)."""
        return self.module.layer_names()

    def resolve_layer(self, layer: str) -> str:
        """A layer name, or a container name meaning its last layer ('layer4' -> 'layer4.2')."""
        layers = self.layers
        if layer in layers:
            return layer
        inside = [name for name in layers if name.startswith(layer + ".")]
        if inside:
            return inside[-1]
        raise ValueError(f"unknown layer {layer!r} for {self.name or 'this model'}; layers: {', '.join(layers)}")

    def tap(self, images: Float[Array, "b h w 3"], layer: str) -> tuple[Array, "Head"]:
        """The activation at `layer` and the head mapping it to the logits.

        head(activation) reproduces model(images) exactly: both run the same stages."""
        check_images(images)
        layer = self.resolve_layer(layer)
        activation = self.module.apply({"params": self.params}, images, stop=layer)
        return activation, Head(self, layer)

    def activations(self, images: Float[Array, "b h w 3"]) -> tuple[Array, dict[str, Array]]:
        """(logits, {layer: activation}) for every layer, in one forward pass."""
        check_images(images)
        logits, state = self.module.apply({"params": self.params}, images, mutable=["activations"])
        return logits, state["activations"]["stages"][0]

    def with_nonlinearity(self, nonlinearity: str) -> "Model":
        """The same model whose ReLU/ReLU6/max-pool backward rules follow `nonlinearity`."""
        check_nonlinearity(nonlinearity)
        return dataclasses.replace(self, module=self.module.clone(nonlinearity=nonlinearity))

    def astype(self, dtype: Any) -> "Model":
        """The model with floating parameters cast to `dtype` (float64 parity runs, bf16 speed)."""
        cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
        return dataclasses.replace(self, params=jax.tree_util.tree_map(cast, self.params))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["model"], meta_fields=["layer"])
@dataclasses.dataclass(frozen=True)
class Head:
    """The part of `model` after `layer`: activation -> logits."""

    model: Model
    layer: str

    def __call__(self, activation: Array) -> Float[Array, "b k"]:
        return self.model.module.apply({"params": self.model.params}, activation, start=self.layer)
