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
import numpy as np
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
    jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["module", "name", "dtype"]
)
@dataclasses.dataclass(frozen=True)
class Model:
    """A classifier: `model(images) -> logits` for NHWC images in [0, 1].

    `dtype` (set by `astype`): the floating dtype the model computes in. Its inputs (images after
    normalisation, a tap's activation, intervention values) are cast to it on the way in, and what
    it returns (logits, activations, read site values) is cast back to the dtype of the input on
    the way out, so a bfloat16 model inside a float32 method computes its layers in bfloat16 while
    the method (path points, gradients w.r.t. images and sites, their sums) stays in float32.
    None: the model computes in the inputs' dtype (the layers cast their parameters to it)."""

    module: Classifier
    params: Params
    name: str = ""
    dtype: np.dtype | None = None

    def __call__(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b k"]:
        check_images(images)
        return self._apply({"params": self.params}, images)

    def _apply(self, variables: Mapping, x: Array, *, start: str | None = None, normalised: bool = False, **options) -> Any:
        """`module.apply` in the model's compute dtype (see the class docstring). Normalisation
        stays in the caller's precision: the first rounding is of the normalised input."""
        outer = jnp.result_type(x)
        if self.dtype is None or outer == self.dtype:
            return self.module.apply(variables, x, start=start, normalised=normalised, **options)
        if start is None and not normalised:
            x, normalised = self.module.normalise(x), True
        result = self.module.apply(variables, x.astype(self.dtype), start=start, normalised=normalised, **options)
        back = lambda a: a.astype(outer) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return jax.tree_util.tree_map(back, result)

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
        return self._apply({"params": self.params}, inputs, normalised=True)

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
    def classifier_input(self) -> str:
        """The layer whose output the final linear classifier reads (ResNet 'avgpool', a ViT's final
        norm, of which the classifier reads the class token); '' if the architecture declares none."""
        return self.module.classifier_input

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
        start: str | None = None,
        stop: str | None = None,
        normalised: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Run the model with interventions at named sites; several sites per call.

        replace: {site: value} puts a constant in the site's place (nothing flows back through it);
        perturb: {site: offset} adds an offset (zeros, differentiated, give the gradient at the site);
        read: sites whose values (after the interventions) are returned.
        start: `images` is the output of this stage (a tap's activation), and only the stages after
          it run (default: `images` are images and every stage runs).
        stop: the last stage to run (default: to the logits).
        normalised: `images` are already in the model's normalised space (`normalise`), as for
          `from_normalised`: paths built there keep the references' float32 arithmetic.
        Returns (output of the last stage run, {site: value} for `read`)."""
        if start is None:
            check_images(images)
        else:
            start = self.resolve_layer(start)
        stop = None if stop is None else self.resolve_layer(stop)
        replace = {self.resolve_site(s): v for s, v in (replace or {}).items()}
        perturb = {self.resolve_site(s): v for s, v in (perturb or {}).items()}
        read = [self.resolve_site(s) for s in read]
        if replace or perturb:
            self._check_site_shapes(images, {**replace, **perturb}, start, stop, normalised)
        variables = {"params": self.params}
        if replace:
            variables[REPLACE] = self._site_tree(replace)
        if perturb:
            variables[PERTURB] = self._site_tree(perturb)
        run = dict(start=start, stop=stop, normalised=normalised)
        if not read:
            return self._apply(variables, images, **run), {}
        output, state = self._apply(variables, images, **run, mutable=[READ])
        recorded = self._site_values(state[READ])
        missing = [s for s in read if s not in recorded]
        if missing:
            raise ValueError(f"sites {', '.join(missing)} are not reached between start={start!r} and stop={stop!r}")
        return output, {s: recorded[s] for s in read}

    def _check_site_shapes(
        self, images: Array, values: Mapping[str, Array], start: str | None, stop: str | None, normalised: bool
    ) -> None:
        _, expected = jax.eval_shape(
            lambda x: self.intervene(x, read=list(values), start=start, stop=stop, normalised=normalised), images
        )
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

    def tap(self, images: Float[Array, "b h w 3"], layer: str, *, normalised: bool = False) -> tuple[Array, "Head"]:
        """The activation at `layer` and the head mapping it to the logits (`normalised` as in
        `intervene`).

        head(activation) reproduces model(images) exactly: both run the same stages."""
        layer = self.resolve_layer(layer)
        activation, _ = self.intervene(images, stop=layer, normalised=normalised)
        return activation, Head(self, layer)

    def representation_layer(self, layer: str | None = None) -> str:
        """`layer` resolved to a stage name; None: the input of the final linear classifier."""
        if layer is not None:
            return self.resolve_layer(layer)
        if not self.classifier_input:
            raise ValueError(
                f"{self.name or 'this model'} declares no final linear classifier to read a representation "
                f"before; choose a layer by name, one of: {', '.join(self.layers)}"
            )
        return self.classifier_input

    def representation(self, images: Float[Array, "b h w 3"], layer: str | None = None) -> Float[Array, "b d"]:
        """Each image's representation at `layer`, flattened: by default the features the final
        linear classifier reads (the pooled features of a CNN, the class token of a ViT's final
        norm). Any other layer gives its whole output. Runs the model only up to that layer."""
        layer = self.representation_layer(layer)
        activation, _ = self.intervene(images, stop=layer)
        if layer == self.classifier_input:
            activation = self.module.classifier_features(activation)
        return activation.reshape(activation.shape[0], -1)

    def activations(self, images: Float[Array, "b h w 3"]) -> tuple[Array, dict[str, Array]]:
        """(logits, {layer: activation}) for every layer, in one forward pass."""
        return self.intervene(images, read=self.layers)

    def with_nonlinearity(self, nonlinearity: str) -> "Model":
        """The same model whose ReLU/ReLU6/max-pool backward rules follow `nonlinearity`."""
        check_nonlinearity(nonlinearity)
        return dataclasses.replace(self, module=self.module.clone(nonlinearity=nonlinearity))

    def astype(self, dtype: Any) -> "Model":
        """The model computing in the floating dtype `dtype`: its floating parameters cast to it,
        and its inputs and outputs cast at its boundary (see the class docstring). float64 for
        parity runs (with float64 images, as before); bfloat16 for throughput on TPUs and GPUs:
        activations and parameters in bfloat16, the method around it and its maps in float32."""
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"a model computes in a floating dtype (float32, bfloat16, float64), got {dtype}")
        cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
        return dataclasses.replace(self, params=jax.tree_util.tree_map(cast, self.params), dtype=dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["model"], meta_fields=["layer"])
@dataclasses.dataclass(frozen=True)
class Head:
    """The part of `model` after `layer`: activation -> logits."""

    model: Model
    layer: str

    def __call__(self, activation: Array) -> Float[Array, "b k"]:
        return self.model._apply({"params": self.model.params}, activation, start=self.layer)
