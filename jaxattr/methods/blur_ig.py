"""Blur IG (Xu et al., CVPR 2020) as PAIR saliency 0.2.1 computes it.

The path runs from the image blurred at max_sigma back to the image through SciPy's zero-padded
Gaussian blur: p_i = blur(x, sigma_i) with sigma_i = i * max_sigma / steps (or its square root),
i = 0..steps-1. Its tangent is a forward difference in sigma, d_i = (blur(x, sigma_i + grad_step)
- p_i) / grad_step, and the result is -sum_i dsigma_i * d_i * grad score(p_i) ~ f(x) - f(blur(x,
max_sigma)): the gradient is taken at the sharper end of each segment. It is a path of the
`jaxattr.paths` engine whose node k is the step index.

For sigma_i + grad_step < 0.125 the kernel radius is 0, so d_0 is exactly zero, as in the
reference. Reference fix: with batch_size > 1 PAIR weights every point of a batch by the dsigma of
the batch's last step (visible only with sqrt=True); here each step has its own dsigma and `chunk`
changes memory, never the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxattr import maps, paths
from jaxattr.blur import AxisBlur, axis_blur, blur_axes, toeplitz_blur, zero_padded_kernels
from jaxattr.config import AUTO_CHUNK, Chunk, Config, Footprint, chunk_size, config, number, pass_count, static
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, path_scores, resolve_targets
from jaxattr.methods.base import MethodSpec, register, run_compiled


@config
class BlurIGConfig(Config):
    """PAIR saliency `BlurIG.GetMask` defaults. The sigmas are static: they build the blur kernels."""

    max_sigma: float = static(50.0, number(0))  # blur of the path's start
    steps: int = static(100, pass_count())
    grad_step: float = static(0.01, number(0, exclusive_minimum=True))  # sigma increment of the forward difference
    sqrt: bool = static(False)  # sigma_i = sqrt(i * max_sigma / steps): finer steps at low blur
    # Steps evaluated per gradient batch (PAIR's batch_size): memory and speed, never results.
    # "auto": chosen from the batch (`resolve_chunks`); None: all at once.
    chunk: Chunk = static(AUTO_CHUNK, chunk_size())
    output: Output = static("logit")  # differentiate the target's logit or its softmax probability

    def footprint(self, image_shape: tuple[int, ...]) -> Footprint:
        # Per axis: float64 kernel rows of 2 * steps sigmas (and their float32 slices), and per
        # path point in flight a size x size Toeplitz matrix (with slices).
        side, passes = max(image_shape[:2]), min(self.chunk or self.steps, self.steps)
        return Footprint(passes=passes, fixed_bytes=2 * (2 * self.steps * 2 * side * 24 + passes * side * side * 16))


def blur_sigmas(config: BlurIGConfig) -> np.ndarray:
    """sigma_0..sigma_steps in float64, as PAIR's Python floats: i * max_sigma / steps (sqrt'ed)."""
    sigmas = np.arange(config.steps + 1, dtype=np.float64) * config.max_sigma / config.steps
    return np.sqrt(sigmas) if config.sqrt else sigmas


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["images", "height", "width"], meta_fields=["grad_step"]
)
@dataclasses.dataclass(frozen=True)
class BlurPath:
    """Blur IG's path: node k (a step index) is blur(images, sigma_k).

    Per axis a table of zero-padded kernels (`jaxattr.blur.zero_padded_kernels`): row 2k holds
    sigma_k, row 2k + 1 sigma_k + grad_step."""

    images: Float[Array, "b h w c"]
    height: AxisBlur
    width: AxisBlur
    grad_step: float

    constant_tangent: ClassVar[bool] = False

    def _blurred(self, rows: Int[Array, " k"]) -> Float[Array, "k b h w c"]:
        _, height, width, _ = self.images.shape

        def blur(row):
            rows, cols = toeplitz_blur(self.height, row, height), toeplitz_blur(self.width, row, width)
            return blur_axes(self.images, rows, cols)

        return jax.vmap(blur)(rows)

    def points(self, nodes: Float[Array, " k"]) -> Float[Array, "k b h w c"]:
        return self._blurred(2 * nodes.astype(jnp.int32))

    def tangents(self, nodes: Float[Array, " k"]) -> Float[Array, "k b h w c"]:
        rows = 2 * nodes.astype(jnp.int32)
        # (blur at sigma + grad_step - blur at sigma) / grad_step in the images' dtype, PAIR's order.
        return (self._blurred(rows + 1) - self._blurred(rows)) / self.grad_step


def blur_path(images: Float[Array, "b h w c"], config: BlurIGConfig) -> tuple[BlurPath, paths.Quadrature]:
    """The path and its rule: nodes 0..steps-1 (step indices), weights dsigma_i = sigma_{i+1} - sigma_i."""
    sigmas = blur_sigmas(config)
    # sigma_0, sigma_0 + h, sigma_1, sigma_1 + h, ... (float64 sums, as PAIR's Python floats).
    blurs = np.stack([sigmas[:-1], sigmas[:-1] + config.grad_step], axis=1).ravel()
    _, height, width, _ = images.shape

    def table(size: int) -> AxisBlur:
        return axis_blur(zero_padded_kernels(blurs, size), size, images.dtype)

    path = BlurPath(images, table(height), table(width), config.grad_step)
    return path, paths.Quadrature(np.arange(config.steps, dtype=np.float64), np.diff(sigmas))


@jax.jit
def _blur_ig(forward, images, targets, key, config: BlurIGConfig):
    del key
    targets = resolve_targets(forward, images, targets)
    path, rule = blur_path(images, config)
    return -paths.integrate(path_scores(forward, targets, config.output), path, rule, chunk=config.chunk)


def blur_ig(
    model, images: Float[Array, "b h w 3"], targets=None, *, config: BlurIGConfig = BlurIGConfig(), key=None
) -> Float[Array, "b h w 3"]:
    """Blur IG of each image's target (default: its predicted class)."""
    return run_compiled(_blur_ig, BlurIGConfig, model, images, targets, config=config, key=key)


register(
    MethodSpec(
        "blur_ig",
        blur_ig,
        BlurIGConfig,
        "Blur IG (PAIR saliency): integrated gradients along a Gaussian blur path to the image",
        saliency=maps.abs_sum,
        contrast=Contrast("min", 99.0),
    )
)
