"""Plain gradients: the saliency map (Simonyan et al.), gradient x input, and SmoothGrad / VarGrad
(Smilkov et al. 2017; Adebayo et al. 2018) around any attribution."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr import maps
from jaxattr.config import AUTO_CHUNK, Check, Chunk, Config, Footprint, chunk_size, config, number, pass_count, static, traced
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, image_keys, input_gradients, resolve_targets
from jaxattr.methods.base import Method, MethodSpec, register, run_compiled
from jaxattr.paths import chunked_sum


@config
class SaliencyConfig(Config):
    output: Output = static("logit")  # differentiate the target's logit or its softmax probability
    multiply_by_inputs: bool = static(False)  # gradient x input


@jax.jit
def _saliency(forward, images, targets, key, config: SaliencyConfig):
    del key
    targets = resolve_targets(forward, images, targets)
    _, grads = input_gradients(forward, images, targets, config.output)
    return grads * images if config.multiply_by_inputs else grads


def saliency(
    model, images: Float[Array, "b h w 3"], targets=None, *, config: SaliencyConfig = SaliencyConfig(), key=None
) -> Float[Array, "b h w 3"]:
    """d score / d image for each image's target (default: its predicted class)."""
    return run_compiled(_saliency, SaliencyConfig, model, images, targets, config=config, key=key)


SALIENCY = register(
    MethodSpec(
        "saliency",
        saliency,
        SaliencyConfig,
        "input gradient of the target score",
        saliency=maps.abs_sum,
        contrast=Contrast("min", 99.0),
    )
)


# ------------------------------------------------------------------------------ noise averaging

Smoothing = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]
_BASE = Check(
    lambda v: isinstance(v, Method) and not v.spec.wraps,
    "a method bound to its config, e.g. jaxattr.method('integrated_gradients', steps=16), that wraps no other",
)


@config
class SmoothGradConfig(Config):
    """Averages of a base attribution over noisy copies of each image (PAIR saliency defaults).

    base: any registered method bound to its config (static: the base's own hyper-parameters are
    compiled in). kind (captum NoiseTunnel's names): 'smoothgrad' mean of the attributions,
    'smoothgrad_sq' mean of their squares (PAIR's magnitude=True), 'vargrad' their variance
    E[a^2] - E[a]^2."""

    base: Method = static(SALIENCY.build(), _BASE)
    kind: Smoothing = static("smoothgrad")
    samples: int = static(25, pass_count())  # PAIR nsamples (captum nt_samples: 5)
    # Noise standard deviation: relative to each image's value range max(x) - min(x) (PAIR's
    # stdev_spread 0.15), or absolute (captum's stdevs, default 1.0) with relative=False.
    stdev: float = traced(0.15, number(0))
    relative: bool = static(True)
    # Samples per batch (captum nt_samples_batch_size): memory and speed. "auto": chosen from the
    # batch (`resolve_chunks`); None: all at once.
    chunk: Chunk = static(AUTO_CHUNK, chunk_size())

    def needs_key(self) -> bool:
        return True  # the noise

    def footprint(self, image_shape: tuple[int, ...]) -> Footprint:
        base = self.base.config.footprint(image_shape)
        keys = 16 * self.samples  # a noise key and a base key per sample
        return Footprint(passes=min(self.chunk or self.samples, self.samples) * base.passes, fixed_bytes=base.fixed_bytes + keys)


def _noise_scale(images: Float[Array, "b h w c"], config: SmoothGradConfig) -> Float[Array, "b 1 1 1"]:
    stdev = jnp.asarray(config.stdev, images.dtype)
    if not config.relative:
        return jnp.broadcast_to(stdev, (images.shape[0], 1, 1, 1))
    spread = jnp.max(images, axis=(1, 2, 3), keepdims=True) - jnp.min(images, axis=(1, 2, 3), keepdims=True)
    return stdev * spread


def _standard_normal(key: jax.Array, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    draw = lambda k: jax.random.normal(k, images.shape[1:], images.dtype)
    return jax.vmap(draw)(image_keys(key, images.shape[0]))


@jax.jit
def _smoothgrad(forward, images, targets, key, config: SmoothGradConfig, noise):
    targets = resolve_targets(forward, images, targets)
    base = config.base
    stochastic_base = base.stochastic
    noise_key, base_key = jax.random.split(key) if key is not None else (None, None)
    if noise is None:
        scale = _noise_scale(images, config)
        sources = jax.random.split(noise_key, config.samples)
        perturb = jax.vmap(lambda k: scale * _standard_normal(k, images))
    else:
        sources, perturb = jnp.asarray(noise, images.dtype), lambda n: n
    base_keys = jax.random.split(base_key, config.samples) if stochastic_base else None

    def chunk_sums(part):
        chunk_sources, chunk_keys = part
        attributions = jax.vmap(lambda n, k: base(forward, images + n, targets, key=k))(perturb(chunk_sources), chunk_keys)
        return jnp.sum(attributions, axis=0), jnp.sum(attributions * attributions, axis=0)

    total, total_sq = chunked_sum(chunk_sums, (sources, base_keys), chunk=config.chunk)
    mean, mean_sq = total / config.samples, total_sq / config.samples
    if config.kind == "smoothgrad":
        return mean
    if config.kind == "smoothgrad_sq":
        return mean_sq
    return mean_sq - mean * mean


def smoothgrad(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    config: SmoothGradConfig = SmoothGradConfig(),
    key: jax.Array | None = None,
    noise: Float[Array, "s b h w 3"] | None = None,
) -> Array:
    """SmoothGrad / SmoothGrad² / VarGrad of the attribution `config.base` for each image's target.

    Targets are resolved on the clean images. Noise comes from `key` (per sample and per image, so
    neither the chunk size nor the batch changes an image's draws), or explicitly: `noise` of shape
    (samples, b, h, w, c) is added as is (parity tests feed a reference's draws). Samples are
    evaluated `config.chunk` at a time, each sample a vmapped call of the base method."""
    base = getattr(config, "base", None)
    if isinstance(base, Method) and key is None and (noise is None or base.stochastic):
        raise ValueError(f"smoothgrad of {base.spec.name} is random: pass key=jax.random.key(seed)")
    if noise is not None and jnp.shape(noise) != (config.samples, *jnp.shape(images)):
        raise ValueError(f"noise must have shape {(config.samples, *jnp.shape(images))}, got {jnp.shape(noise)}")
    return run_compiled(_smoothgrad, SmoothGradConfig, model, images, targets, config=config, key=key, noise=noise)


def _smoothed_map(attributions: Array) -> Float[Array, "b h w"]:
    # Per-pixel attributions as PAIR shows SmoothGrad; channel-less maps (a Grad-CAM base) pass.
    return maps.abs_sum(attributions) if attributions.ndim == 4 else attributions


register(
    MethodSpec(
        "smoothgrad",
        smoothgrad,
        SmoothGradConfig,
        "any attribution averaged over noisy copies of the image (SmoothGrad, SmoothGrad², VarGrad)",
        saliency=_smoothed_map,
        contrast=Contrast("min", 99.0),
        stochastic=True,
        wraps=True,
    )
)
