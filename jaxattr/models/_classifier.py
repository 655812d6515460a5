"""The one mechanism every architecture shares: a classifier as a list of named stages.

An architecture is a Flax module whose `stages()` returns `(name, fn)` pairs in execution order,
named after the torch module whose output each stage reproduces (`layer4.1`, `features.28`,
`blocks.11`, ...). Each `fn` creates its submodules lazily when called, so `stages()` itself
touches no variables and layer names are known without parameters. Running the stages in a
half-open range gives both layer taps (`stop=layer`) and their heads (`start=layer`), which is
what Grad-CAM, IIA and IG2 are built on.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float

Stage = tuple[str, Callable[[Array], Array]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """Base of every port. Subclasses declare `mean`, `std` and `nonlinearity` fields and
    implement `stages()`. Input: NHWC float images in [0, 1]; normalisation happens inside."""

    def stages(self) -> Sequence[Stage]:
        raise NotImplementedError

    def normalise(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
        mean = jnp.asarray(self.mean, images.dtype)
        std = jnp.asarray(self.std, images.dtype)
        return (images - mean) / std

    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages())

    @nn.compact
    def __call__(self, x: Array, *, start: str | None = None, stop: str | None = None) -> Array:
        """Run the stages after `start` up to and including `stop`.

        start=None means `x` is a batch of pixel images (normalised first); otherwise `x` is the
        output of layer `start`. stop=None runs to the logits."""
        stages = self.stages()
        names = [name for name, _ in stages]
        first = 0 if start is None else names.index(start) + 1
        last = len(stages) if stop is None else names.index(stop) + 1
        if start is None:
            x = self.normalise(x)
        outputs = {}
        for name, fn in stages[first:last]:
            x = outputs[name] = fn(x)
        # Recorded only when the caller makes "activations" mutable (Model.activations).
        self.sow("activations", "stages", outputs)
        return x
