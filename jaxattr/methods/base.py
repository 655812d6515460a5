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

from jaxattr.config import AUTO_CHUNK, Config, ConfigError
from jaxattr.maps import Contrast
from jaxattr.methods._common import (
    as_forward,
    check_inputs,
    check_key,
    check_target_range,
    check_values,
    is_key_batch,
    predicted_classes,
)

Targets = Int[Array, " b"] | Int[Array, "b k"] | int | None


class Attribution(Protocol):
    """attribution(model, images, targets=None, *, key=None) -> attributions (batch first)."""

    def __call__(
        self, model: Any, images: Float[Array, "b h w 3"], targets: Targets = None, *, key: jax.Array | None = None
    ) -> Array: ...


@dataclasses.dataclass(frozen=True)
class ExtraOutput:
    """Extras (`MethodSpec.extras`) that are pictures in their own right (IG2's counterfactuals):
    `jaxattr explain --<flag>` writes them as `<output>_<suffix>.png`, and never as `.npy`.
    `pictures(extras)` maps one image's extras (arrays without the batch axis) to
    {suffix: (h, w, 3) or (h, w) array in [0, 1]}; `uses` names the extras it reads."""

    flag: str  # the explain option that asks for them, e.g. "save-path"
    help: str
    uses: tuple[str, ...]
    pictures: Callable[[dict[str, Any]], dict[str, Any]]


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
    stochastic: bool = False  # always needs a key (`Method.stochastic` adds settings that draw random numbers)
    takes_baselines: bool = False  # accepts baselines= (an array replacing the config's named baseline)
    # accepts references= (reference images, e.g. IG2's counterfactual pool); `jaxattr explain`
    # loads them from --references with the model's eval transform
    takes_references: bool = False
    wraps: bool = False  # its config holds a base method (`base`), e.g. SmoothGrad
    # Outputs besides the attributions: a call with `function`'s arguments returning
    # (attributions, {name: array, batch first}) from the same run, e.g. I-GOS's low-resolution
    # masks; `explain` returns them in Explanation.extras, `jaxattr explain` saves each one as
    # <image>.<name>.npy beside the map, except those `extra_outputs` turn into pictures. None: none.
    extras: Callable[..., tuple[Array, dict[str, Array]]] | None = None
    extra_outputs: tuple[ExtraOutput, ...] = ()  # extras `jaxattr explain` writes as pictures when asked

    def build(self, config: Config | None = None, **overrides: Any) -> "Method":
        """This method bound to `config` (default: the reference's defaults) with `overrides`."""
        return Method(self, make_config(self, config, **overrides))


def make_config(spec: MethodSpec, config: Config | None = None, **overrides: Any) -> Config:
    """`config` (default: `spec`'s defaults) with `overrides` applied and validated."""
    config = spec.config() if config is None else config
    if not isinstance(config, spec.config):
        raise TypeError(f"{spec.name}: {config_type_message(spec.config, config)}")
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

    @property
    def stochastic(self) -> bool:
        """Whether it needs a key: a stochastic method, or settings that draw random numbers (a
        'uniform' baseline). The CLI derives per-file keys for exactly these."""
        return self.spec.stochastic or self.config.needs_key()

    def __call__(self, model, images, targets=None, *, key=None, **arrays) -> Array:
        return self.spec.function(model, images, targets, config=self.config, key=key, **arrays)

    def with_extras(self, model, images, targets=None, *, key=None, **arrays) -> tuple[Array, dict[str, Array]]:
        """(attributions, the spec's extra outputs by name) from one run; no extras: an empty dict."""
        if self.spec.extras is None:
            return self(model, images, targets, key=key, **arrays), {}
        return self.spec.extras(model, images, targets, config=self.config, key=key, **arrays)

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


def config_type_message(expected: type[Config], config: Any) -> str:
    hint = f"; build one with {expected.__name__}(**options)" if isinstance(config, dict) else ""
    return f"config must be a {expected.__name__}, got {type(config).__name__}{hint}"


def check_call(
    forward: Any, images: Array, targets: Targets, key: jax.Array | None, *, several_classes: bool = False
) -> None:
    """What every method checks at its public boundary, before anything is traced: shapes and
    dtypes, finite pixel values in [0, 1] (within a margin), class indices the model has, a real key."""
    check_inputs(images, targets, several_classes=several_classes)
    check_key(key, images.shape[0])
    check_values(images)
    check_target_range(forward, images, targets)


# Images per model call that "auto" chunks aim at, by backend. On CPU 32 images per call took
# 0.79-0.98x the time of 128 at once (ResNet-18/50, 64 and 224 px, `benchmarks/ig.py --chunks`);
# elsewhere a call holds everything at once, and `jaxattr.memory.fit` bounds it by the memory
# available.
IMAGES_PER_CALL = {"cpu": 32}


def resolve_chunks(config: Config, batch: int, image_shape: tuple[int, ...]) -> Config:
    """`config` with every `chunk` that is "auto", its base method's included, made a size: on a
    backend in `IMAGES_PER_CALL`, a chunk that keeps `batch` images times the passes per image in
    one call within that number (at least 1), the innermost chunk filled first; elsewhere None
    (all at once). Chunks change speed and memory, never results beyond rounding."""
    per_call = IMAGES_PER_CALL.get(jax.default_backend())
    return _resolve_chunks(config, None if per_call is None else max(1, per_call // batch), image_shape)


def _resolve_chunks(config: Config, per_image: int | None, image_shape: tuple[int, ...]) -> Config:
    base = getattr(config, "base", None)
    inner = 1
    if isinstance(base, Method):
        base = Method(base.spec, _resolve_chunks(base.config, per_image, image_shape))
        config = config.replace(base=base)
        inner = base.config.footprint(image_shape).passes
    if getattr(config, "chunk", None) != AUTO_CHUNK:
        return config
    if per_image is None:
        return config.replace(chunk=None)
    items = config.replace(chunk=None).footprint(image_shape).passes // inner  # what the chunk splits
    return config.replace(chunk=_even_chunk(items, max(1, per_image // inner)))


def _even_chunk(items: int, limit: int) -> int:
    """A chunk of at most `limit` of `items`: the largest divisor of `items` from limit / 2 up, so
    every chunk has one shape and the model is compiled once (50 steps by 32: two chunks of 25,
    not 32 and 18); else `limit`, with a smaller last chunk."""
    if items <= limit:
        return items
    return next((c for c in range(limit, (limit + 1) // 2 - 1, -1) if items % c == 0), limit)


def run_compiled(
    compiled: Callable[..., Array],
    config_class: type[Config],
    model: Any,
    images: Array,
    targets: Targets,
    *,
    config: Config,
    key: jax.Array | None,
    per_image: dict[str, Array] | None = None,
    **arrays: Any,
) -> Any:
    """The public boundary every method shares: validate, then run the jit-compiled
    `compiled(forward, images, targets, key, config, **per_image, **arrays)`.

    `key` is one key for the batch (image i draws from fold_in(key, i)) or one typed key per
    image, shape (b,): each image is then computed from its own key alone, so its map does not
    depend on which batch it came in (the CLI keys images by file name). `per_image` holds arrays
    with a leading batch axis that belong to their image (IG2's references per explicand): with
    per-image keys each image's call gets its own rows. The result is a pytree with a leading
    batch axis (attributions, or a method's richer result).

    `targets` of shape (b, K) explains K classes of every image in one program, vmapped over the
    class axis: attributions (b, K, ...), each class's equal to a run with that class alone (same
    key, so the same noise). "auto" chunks are made sizes for this batch here (`resolve_chunks`)."""
    if targets is not None and jnp.ndim(targets) == 2:
        check_call(as_forward(model), images, targets, key, several_classes=True)
        if isinstance(config, Config):  # else the TypeError of the call below
            config = resolve_chunks(config, images.shape[0] * jnp.shape(targets)[1], images.shape[1:])
        one_class = lambda t: run_compiled(compiled, config_class, model, images, t, config=config, key=key, per_image=per_image, **arrays)
        return jax.vmap(one_class, in_axes=1, out_axes=1)(jnp.asarray(targets, jnp.int32))
    if not isinstance(config, config_class):
        raise TypeError(config_type_message(config_class, config))
    forward = as_forward(model)
    check_call(forward, images, targets, key)
    config = resolve_chunks(config, images.shape[0], images.shape[1:])
    per_image = per_image or {}
    if not is_key_batch(key, images.shape[0]):
        return compiled(forward, images, targets, key, config, **per_image, **arrays)
    whole = {name: a for name, a in arrays.items() if a is not None}
    if whole:
        raise ValueError(f"per-image keys cannot be combined with {', '.join(whole)}: pass one key")
    targets = predicted_classes(forward, images) if targets is None else targets
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), images.shape[:1])

    def one(x, t, k, rows):
        single = compiled(forward, x[None], t[None], k, config, **{n: r[None] for n, r in rows.items()}, **arrays)
        return jax.tree_util.tree_map(lambda leaf: leaf[0], single)

    return jax.vmap(one)(images, targets, key, per_image)

