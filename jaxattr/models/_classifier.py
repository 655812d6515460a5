"""The one mechanism every architecture shares: a classifier as a list of named stages, with
named intervention sites.

An architecture is a Flax module whose `stages()` returns `(name, fn)` pairs in execution order,
named after the torch module whose output each stage reproduces (`layer4.1`, `features.28`,
`blocks.11`, ...). Each `fn` creates its submodules lazily when called, so `stages()` itself
touches no variables and layer names are known without parameters. Running the stages in a
half-open range gives both layer taps (`stop=layer`) and their heads (`start=layer`).

Intervention sites are the points where a caller may read a value, replace it by a constant, or
add a perturbation to it (zeros, whose gradient is the gradient at the site). Every stage output
is a site named after its stage; a module may declare internal sites (a ViT block's attention).
A site is a Flax variable in three collections (`REPLACE`, `PERTURB`, `READ`), living in the module
that computes the value; `Model.intervene` builds and reads those collections from site names, so
nothing above the models sees Flax.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float

Stage = tuple[str, Callable[[Array], Array]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REPLACE = "site_replace"  # a value taking the site's place (a constant: no gradient flows back through it)
PERTURB = "site_perturb"  # an offset added at the site
READ = "site_read"  # the site's value, recorded when the collection is mutable


def site(module: nn.Module, name: str, value: Array) -> Array:
    """The value at site `name` of `module` after the caller's interventions (replace, then
    perturb), recorded when reading. Without interventions this is `value` itself."""
    if module.has_variable(REPLACE, name):
        value = module.get_variable(REPLACE, name).astype(value.dtype)
    if module.has_variable(PERTURB, name):
        value = value + module.get_variable(PERTURB, name).astype(value.dtype)
    if module.is_mutable_collection(READ):
        module.put_variable(READ, name, value)
    return value


def stage_variable(stage: str) -> str:
    """The variable name of a stage output's site in the classifier's scope. A stage and the module
    computing it share a name ("blocks.11"), and that module's own sites live in a child scope of
    that name, so the stage output is stored under another key."""
    return f"{stage}.output"


class Classifier(nn.Module):
    """Base of every port. Subclasses declare `mean`, `std` and `nonlinearity` fields, implement
    `stages()`, and name their default feature layer (`feature_layer`: the last spatial feature
    map, used by Grad-CAM, IIA, ...). Input: NHWC float images in [0, 1]; normalisation happens
    inside."""

    feature_layer = ""

    def stages(self) -> Sequence[Stage]:
        raise NotImplementedError

    def internal_sites(self) -> Mapping[str, tuple[tuple[str, ...], str]]:
        """Sites inside stages: public name -> (module path, variable name). None by default."""
        return {}

    def normalise(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
        mean = jnp.asarray(self.mean, images.dtype)
        std = jnp.asarray(self.std, images.dtype)
        return (images - mean) / std

    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages())

    @nn.compact
    def __call__(
        self, x: Array, *, start: str | None = None, stop: str | None = None, normalised: bool = False
    ) -> Array:
        """Run the stages after `start` up to and including `stop`.

        start=None means `x` is a batch of images: pixels in [0, 1], normalised first, or already
        in the model's normalised space with `normalised=True`. Otherwise `x` is the output of layer
        `start`. stop=None runs to the logits."""
        stages = self.stages()
        names = [name for name, _ in stages]
        first = 0 if start is None else names.index(start) + 1
        last = len(stages) if stop is None else names.index(stop) + 1
        if start is None and not normalised:
            x = self.normalise(x)
        for name, fn in stages[first:last]:
            x = site(self, stage_variable(name), fn(x))
        return x
