"""`Model`: a Flax classifier bound to its parameters, as a pytree.

Parameters are the pytree's data and the module is static, so a `Model` is an ordinary argument
of jit-compiled methods (no retrace per call, no parameters baked into the program). Methods see
a callable `images -> logits` and, where they need internals, one intervention API over named
sites (`sites`, `intervene`), of which `tap` and `Head` are the common special case.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr.models._classifier import PERTURB, READ, REPLACE, Classifier, stage_variable
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

    # ---------------------------------------------------------------------- normalisation

    @property
    def mean(self) -> tuple[float, float, float]:
        """The pixel colour that normalises to zero (the 'mean' baseline, deletion's fill)."""
        return tuple(self.module.mean)

    def normalise(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
        """Pixels in [0, 1] -> the model's input space (what its first layer sees)."""
        return self.module.normalise(images)

    def from_normalised(self, inputs: Float[Array, "b h w 3"]) -> Float[Array, "b k"]:
        """Logits of inputs already in the model's normalised space: model(x) == from_normalised(normalise(x))."""
        check_images(inputs)
        return self.module.apply({"params": self.params}, inputs, normalised=True)

    # ----------------------------------------------------------------------------- layers

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the stages, in execution order (torch module names)."""
        return self.module.layer_names()

    @property
    def feature_layer(self) -> str:
        """The model's default feature layer (last spatial feature map); '' if it declares none."""
        return self.module.feature_layer

    @property
    def sites(self) -> tuple[str, ...]:
        """Every intervention site: each stage's output (named as the stage) and the module-internal
        sites (a ViT block's post-softmax attention: '<block>.<attention module>.attention')."""
        return (*self.layers, *self.module.internal_sites())

    def resolve_layer(self, layer: str) -> str:
        """A layer name, or a container name meaning its last layer ('layer4' -> 'layer4.2')."""
        layers = self.layers
        if layer in layers:
            return layer
        inside = [name for name in layers if name.startswith(layer + ".")]
        if inside:
            return inside[-1]
        raise ValueError(f"unknown layer {layer!r} for {self.name or 'this model'}; layers: {', '.join(layers)}")

    def resolve_site(self, site: str) -> str:
        """A site name, or a layer name as `resolve_layer` takes it."""
        return site if site in self.module.internal_sites() else self.resolve_layer(site)

    def intervene(
        self,
        images: Float[Array, "b h w 3"],
        *,
        replace: Mapping[str, Array] | None = None,
        perturb: Mapping[str, Array] | None = None,
        read: Sequence[str] = (),
        stop: str | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Run the model with interventions at named sites; several sites per call.

        replace: {site: value} puts a constant in the site's place (nothing flows back through it);
        perturb: {site: offset} adds an offset (zeros, differentiated, give the gradient at the site);
        read: sites whose values (after the interventions) are returned.
        stop: the last stage to run (default: to the logits).
        Returns (output of the last stage run, {site: value} for `read`)."""
        check_images(images)
        replace = {self.resolve_site(s): v for s, v in (replace or {}).items()}
        perturb = {self.resolve_site(s): v for s, v in (perturb or {}).items()}
        read = [self.resolve_site(s) for s in read]
        if replace or perturb:
            self._check_site_shapes(images, {**replace, **perturb}, stop)
        variables = {"params": self.params}
        if replace:
            variables[REPLACE] = self._site_tree(replace)
        if perturb:
            variables[PERTURB] = self._site_tree(perturb)
        stop = None if stop is None else self.resolve_layer(stop)
        if not read:
            return self.module.apply(variables, images, stop=stop), {}
        output, state = self.module.apply(variables, images, stop=stop, mutable=[READ])
        recorded = self._site_values(state[READ])
        missing = [s for s in read if s not in recorded]
        if missing:
            raise ValueError(f"sites {', '.join(missing)} are not reached before stop={stop!r}")
        return output, {s: recorded[s] for s in read}

    def _check_site_shapes(self, images: Array, values: Mapping[str, Array], stop: str | None) -> None:
        _, expected = jax.eval_shape(lambda x: self.intervene(x, read=list(values), stop=stop), images)
        for name, value in values.items():
            if tuple(jnp.shape(value)) != tuple(expected[name].shape):
                raise ValueError(
                    f"the value for site {name} must have its shape {tuple(expected[name].shape)}, got {tuple(jnp.shape(value))}"
                )

    def _site_path(self, site: str) -> tuple[str, ...]:
        internal = self.module.internal_sites()
        if site in internal:
            path, variable = internal[site]
            return (*path, variable)
        return (stage_variable(self.resolve_layer(site)),)

    def _site_tree(self, values: Mapping[str, Array]) -> dict:
        tree: dict = {}
        for site, value in values.items():
            *path, variable = self._site_path(site)
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[variable] = value
        return tree

    def _site_values(self, tree: Mapping) -> dict[str, Array]:
        values = {}
        for site in self.sites:
            node = tree
            for part in self._site_path(site):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None:
                values[site] = node
        return values

    def tap(self, images: Float[Array, "b h w 3"], layer: str) -> tuple[Array, "Head"]:
        """The activation at `layer` and the head mapping it to the logits.

        head(activation) reproduces model(images) exactly: both run the same stages."""
        layer = self.resolve_layer(layer)
        activation, _ = self.intervene(images, stop=layer)
        return activation, Head(self, layer)

    def activations(self, images: Float[Array, "b h w 3"]) -> tuple[Array, dict[str, Array]]:
        """(logits, {layer: activation}) for every layer, in one forward pass."""
        return self.intervene(images, read=self.layers)

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
