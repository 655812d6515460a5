"""What an attribution method is: a value you can hold, configure, compose and call.

An `Attribution` is any callable

    attribution(model, images, targets=None, *, key=None) -> attributions

taking a batch of NHWC images in [0, 1] and returning one attribution per image (batch first).
`targets` are class indices, one per image or one for all, None meaning each image's predicted
class; `key` is a `jax.random` key for stochastic methods (one for the batch, or a batch of keys,
one per image). Like optax's `GradientTransformation`, it is a small contract that composes:
SmoothGrad averages any attribution over noisy copies, IG2 is a path search composed with path
integration, evaluators and `jaxattr bench` take any attribution.

Each method module defines a public function with an honest signature,
`method(model, images, targets=None, *, config=..., key=None, ...)`, a config class
(`jaxattr.config`), and a `MethodSpec` registered by name. `MethodSpec.build(config)` binds a config
to the function: the result, a `Method`, is an `Attribution` and a pytree (the function static,
the config its leaves), so it can itself be passed to compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxattr.config import Config, ConfigError
from jaxattr.maps import Contrast
from jaxattr.methods._common import as_forward, check_inputs, is_key_batch, predicted_classes

Targets = Int[Array, " b"] | Int[Array, "b k"] | int | None


class Attribution(Protocol):
    """attribution(model, images, targets=None, *, key=None) -> attributions (batch first)."""

    def __call__(
        self, model: Any, images: Float[Array, "b h w 3"], targets: Targets = None, *, key: jax.Array | None = None
    ) -> Array: ...


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method: everything the library and the CLI need to know about it."""

    name: str
    function: Callable[..., Array]  # the public function: (model, images, targets=None, *, config, key, ...)
    config: type[Config]  # its config class; defaults are the reference implementation's
    description: str
    # attributions (batch first) -> (b, h', w') saliency map, unclipped: what metrics rank.
    saliency: Callable[[Array], Float[Array, "b h w"]]
    contrast: Contrast  # display only: how PNGs scale the saliency map to [0, 1]
    upsample: Literal["bilinear", "bicubic"] = "bilinear"  # saliency map -> image resolution
    needs_model: bool = False  # needs a jaxattr Model (taps, sites, guided rules), not any forward
    stochastic: bool = False  # needs a key
    takes_baselines: bool = False  # accepts baselines= (an array replacing the config's named baseline)
    wraps: bool = False  # its config holds a base method (`base`), e.g. SmoothGrad

    def build(self, config: Config | None = None, **overrides: Any) -> "Method":
        """This method bound to `config` (default: the reference's defaults) with `overrides`."""
        return Method(self, make_config(self, config, **overrides))


def make_config(spec: MethodSpec, config: Config | None = None, **overrides: Any) -> Config:
    """`config` (default: `spec`'s defaults) with `overrides` applied and validated."""
    config = spec.config() if config is None else config
    if not isinstance(config, spec.config):
        raise TypeError(f"{spec.name} takes a {spec.config.__name__}, got {type(config).__name__}")
    options = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise ConfigError(unknown[0], f"{spec.name} has no option {', '.join(unknown)}; options: {', '.join(options)}")
    return config.replace(**overrides) if overrides else config


@functools.partial(jax.tree_util.register_dataclass, data_fields=["config"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class Method:
    """A method bound to its config: an `Attribution`."""

    spec: MethodSpec
    config: Config

    def __call__(self, model, images, targets=None, *, key=None, **arrays) -> Array:
        return self.spec.function(model, images, targets, config=self.config, key=key, **arrays)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.spec.name, "config": self.config.to_dict()}


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    _METHODS[spec.name] = spec
    return spec


def list_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_spec(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_METHODS)}") from None


def run_compiled(
    compiled: Callable[..., Array],
    config_class: type[Config],
    model: Any,
    images: Array,
    targets: Targets,
    *,
    config: Config,
    key: jax.Array | None,
    **arrays: Any,
) -> Array:
    """The public boundary every method shares: validate, then run the jit-compiled
    `compiled(forward, images, targets, key, config, **arrays)`.

    `key` is one key for the batch (image i draws from fold_in(key, i)) or one typed key per
    image, shape (b,): each image is then computed from its own key alone, so its map does not
    depend on which batch it came in (the CLI keys images by file name).

    `targets` of shape (b, K) explains K classes of every image in one program, vmapped over the
    class axis: attributions (b, K, ...), each class's equal to a run with that class alone (same
    key, so the same noise)."""
    check_inputs(images, targets, several_classes=True)
    if jnp.ndim(targets) == 2:
        one_class = lambda t: run_compiled(compiled, config_class, model, images, t, config=config, key=key, **arrays)
        return jax.vmap(one_class, in_axes=1, out_axes=1)(jnp.asarray(targets, jnp.int32))
    if not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")
    forward = as_forward(model)
    if not is_key_batch(key, images.shape[0]):
        return compiled(forward, images, targets, key, config, **arrays)
    per_image = {name: a for name, a in arrays.items() if a is not None}
    if per_image:
        raise ValueError(f"per-image keys cannot be combined with {', '.join(per_image)}: pass one key")
    targets = predicted_classes(forward, images) if targets is None else targets
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), images.shape[:1])
    one = lambda x, t, k: compiled(forward, x[None], t[None], k, config, **arrays)[0]
    return jax.vmap(one)(images, targets, key)

