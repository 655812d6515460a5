"""Plain gradients: the saliency map (Simonyan et al.), gradient x input, and SmoothGrad / VarGrad
(Smilkov et al. 2017; Adebayo et al. 2018) around any registered method."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr import heatmaps
from jaxattr.methods._common import Output, attribution_method, image_keys, input_gradients, resolve_targets
from jaxattr.methods.registry import MethodInfo, method_info, register_method
from jaxattr.paths import check_chunk, chunked_sum


@dataclasses.dataclass(frozen=True)
class SaliencyConfig:
    output: Output = "logit"  # differentiate the target's logit or its softmax probability
    multiply_by_inputs: bool = False  # gradient x input


@attribution_method(SaliencyConfig)
def saliency(forward, images, targets, key, *, config: SaliencyConfig) -> Float[Array, "b h w c"]:
    """d score / d image for each image's target (default: its predicted class)."""
    del key
    targets = resolve_targets(forward, images, targets)
    _, grads = input_gradients(forward, images, targets, config.output)
    return grads * images if config.multiply_by_inputs else grads


register_method(
    MethodInfo("saliency", saliency, SaliencyConfig, heatmaps.grayscale, "input gradient of the target score")
)


# ------------------------------------------------------------------------------ noise averaging

SMOOTHING_KINDS: tuple[str, ...] = ("smoothgrad", "smoothgrad_sq", "vargrad")


@dataclasses.dataclass(frozen=True)
class SmoothGradConfig:
    """Averages of a base method over noisy copies of each image (PAIR saliency defaults).

    kind (captum NoiseTunnel's names): 'smoothgrad' mean of the attributions, 'smoothgrad_sq' mean
    of their squares (PAIR's magnitude=True), 'vargrad' their variance E[a^2] - E[a]^2."""

    base: str = "saliency"  # any registered method (its attributions are averaged, whatever their shape)
    # The base's config, or a mapping of overrides of its defaults (kept as sorted (name, value)
    # pairs so this config stays hashable); None: the base's defaults.
    base_config: Any = None
    kind: str = "smoothgrad"
    samples: int = 25  # PAIR nsamples (captum nt_samples: 5)
    # Noise standard deviation: relative to each image's value range max(x) - min(x) (PAIR's
    # stdev_spread 0.15), or absolute (captum's stdevs, default 1.0) with relative=False.
    stdev: float = 0.15
    relative: bool = True
    chunk: int | None = None  # samples per batch (captum nt_samples_batch_size); None: all at once

    def __post_init__(self):
        if self.kind not in SMOOTHING_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {SMOOTHING_KINDS}")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ValueError(f"samples must be a positive int, got {self.samples!r}")
        check_chunk(self.chunk)
        if not self.stdev >= 0:
            raise ValueError(f"stdev must be >= 0, got {self.stdev!r}")
        if isinstance(self.base_config, Mapping):
            object.__setattr__(self, "base_config", tuple(sorted(self.base_config.items())))
        self.resolved_base_config  # fail here, not inside a trace, on a bad base or option

    @property
    def resolved_base_config(self) -> Any:
        """The config the base method runs with."""
        info = method_info(self.base)
        if self.base_config is None:
            return info.config()
        if isinstance(self.base_config, info.config):
            return self.base_config
        if not isinstance(self.base_config, tuple):
            raise TypeError(
                f"base_config for {self.base} must be a {info.config.__name__} or a mapping of its "
                f"options, got {type(self.base_config).__name__}"
            )
        options = {f.name for f in dataclasses.fields(info.config)}
        unknown = sorted(name for name, _ in self.base_config if name not in options)
        if unknown:
            raise ValueError(f"{self.base} has no option {', '.join(unknown)}; options: {', '.join(sorted(options))}")
        return info.config(**dict(self.base_config))


def _noise_scale(images: Float[Array, "b h w c"], config: SmoothGradConfig) -> Float[Array, "b 1 1 1"]:
    if not config.relative:
        return jnp.full((images.shape[0], 1, 1, 1), config.stdev, images.dtype)
    spread = jnp.max(images, axis=(1, 2, 3), keepdims=True) - jnp.min(images, axis=(1, 2, 3), keepdims=True)
    return config.stdev * spread


def _standard_normal(key: jax.Array, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    draw = lambda k: jax.random.normal(k, images.shape[1:], images.dtype)
    return jax.vmap(draw)(image_keys(key, images.shape[0]))


@attribution_method(SmoothGradConfig)
def smoothgrad(
    forward, images, targets, key, *, config: SmoothGradConfig, noise=None
) -> Float[Array, "b h w c"]:
    """SmoothGrad / SmoothGrad² / VarGrad of `config.base` for each image's target.

    Targets are resolved on the clean images. Noise comes from `key` (per sample and per image, so
    neither the chunk size nor the batch changes an image's draws), or explicitly: `noise` of shape
    (samples, b, h, w, c) is added as is (parity tests feed a reference's draws). Samples are
    evaluated `config.chunk` at a time, each sample a vmapped call of the base method."""
    base = method_info(config.base)
    base_config = config.resolved_base_config
    targets = resolve_targets(forward, images, targets)
    if key is None and (noise is None or base.stochastic):
        raise ValueError(f"smoothgrad of {config.base} is random: pass key=jax.random.key(seed)")
    noise_key, base_key = jax.random.split(key) if key is not None else (None, None)
    if noise is None:
        scale = _noise_scale(images, config)
        sources = jax.random.split(noise_key, config.samples)
        perturb = jax.vmap(lambda k: scale * _standard_normal(k, images))
    else:
        if noise.shape != (config.samples, *images.shape):
            raise ValueError(f"noise must have shape {(config.samples, *images.shape)}, got {noise.shape}")
        sources, perturb = jnp.asarray(noise, images.dtype), lambda n: n
    base_keys = jax.random.split(base_key, config.samples) if base.stochastic else None

    def chunk_sums(part):
        chunk_sources, chunk_keys = part
        attribute = lambda n, k: base.fn(forward, images + n, targets, config=base_config, key=k)
        attributions = jax.vmap(attribute)(perturb(chunk_sources), chunk_keys)
        return jnp.sum(attributions, axis=0), jnp.sum(attributions * attributions, axis=0)

    total, total_sq = chunked_sum(chunk_sums, (sources, base_keys), chunk=config.chunk)
    mean, mean_sq = total / config.samples, total_sq / config.samples
    if config.kind == "smoothgrad":
        return mean
    if config.kind == "smoothgrad_sq":
        return mean_sq
    return mean_sq - mean * mean


def _smoothed_heatmap(attributions: Array) -> Float[Array, "b h w"]:
    # Per-pixel attributions as PAIR shows SmoothGrad; channel-less maps (a Grad-CAM base) scaled.
    return heatmaps.grayscale(attributions) if attributions.ndim == 4 else heatmaps.min_max(attributions)


register_method(
    MethodInfo(
        "smoothgrad",
        smoothgrad,
        SmoothGradConfig,
        _smoothed_heatmap,
        "any gradient method averaged over noisy copies of the image (SmoothGrad, SmoothGrad², VarGrad)",
        stochastic=True,
    )
)
