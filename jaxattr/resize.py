"""Torch-compatible image resizing: `torch.nn.functional.interpolate` in JAX.

`jax.image.resize` neither offers `align_corners=True` nor torch's bicubic kernel (Keys, A = -0.75,
with clamped taps), and it antialiases when downsampling, so methods and ports that must agree
with PyTorch resize here: ViT position embeddings, Grad-CAM upsampling, I-GOS masks
(align_corners=True) and IIA maps (bicubic).

Resizing is separable and linear, so each spatial axis is one (out, in) interpolation matrix built
with NumPy from the static sizes (the rule torch applies, row by row) and applied with an einsum:
differentiable, jit/vmap-friendly, and exact to float32 rounding. Arrays are batch first with the
spatial axes at positions 1 and 2: NHWC images (b, h, w, c) and single-channel maps (b, h, w).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

Method = Literal["bilinear", "bicubic"]
METHODS: tuple[str, ...] = ("bilinear", "bicubic")

# torch's bicubic kernel constant; its antialiased bicubic path uses PIL's -0.5 instead.
_KEYS_A = -0.75
_KEYS_A_ANTIALIAS = -0.5


def _keys_kernel(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at offsets t."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _triangle_kernel(t: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(t))


def _source_positions(size_in: int, size_out: int, align_corners: bool, dtype) -> np.ndarray:
    """Where each output cell samples the input, in input-cell coordinates, as torch computes it
    (in the input's precision: float32 for float32 data)."""
    i = np.arange(size_out, dtype=dtype)
    if align_corners:
        scale = dtype((size_in - 1) / (size_out - 1)) if size_out > 1 else dtype(0)
        return i * scale
    scale = dtype(size_in) / dtype(size_out)
    return (i + dtype(0.5)) * scale - dtype(0.5)


def _bilinear_matrix(size_in: int, size_out: int, align_corners: bool, dtype) -> np.ndarray:
    # torch clamps negative half-pixel source positions to 0 for linear modes (not for cubic).
    src = np.maximum(_source_positions(size_in, size_out, align_corners, dtype), dtype(0))
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo.astype(dtype)
    m = np.zeros((size_out, size_in), dtype)
    rows = np.arange(size_out)
    np.add.at(m, (rows, lo), dtype(1) - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _bicubic_matrix(size_in: int, size_out: int, align_corners: bool, dtype) -> np.ndarray:
    src = _source_positions(size_in, size_out, align_corners, dtype)
    base = np.floor(src)
    frac = src - base
    m = np.zeros((size_out, size_in), dtype)
    rows = np.arange(size_out)
    for offset in (-1, 0, 1, 2):
        # torch reads taps outside the input from the border cell (index clamping).
        taps = np.clip(base.astype(np.int64) + offset, 0, size_in - 1)
        np.add.at(m, (rows, taps), _keys_kernel(frac - offset, _KEYS_A).astype(dtype))
    return m


def _antialias_matrix(size_in: int, size_out: int, method: str, dtype) -> np.ndarray:
    """torch's antialias=True path (PIL's resampling): when downsampling the kernel is stretched
    by the scale; taps outside the input are dropped and each row renormalised to sum to 1.
    Computed in the input's precision as torch does (float64 centres differ by up to 2e-5)."""
    scale = dtype(size_in) / dtype(size_out)
    half_width = dtype(1.0 if method == "bilinear" else 2.0) * max(scale, dtype(1))
    stretch = dtype(1) / max(scale, dtype(1))
    m = np.zeros((size_out, size_in), dtype)
    for i in range(size_out):
        centre = scale * (dtype(i) + dtype(0.5))
        lo = max(int(centre - half_width + dtype(0.5)), 0)
        hi = min(int(centre + half_width + dtype(0.5)), size_in)
        offsets = (np.arange(lo, hi, dtype=dtype) - centre + dtype(0.5)) * stretch
        if method == "bilinear":
            weights = _triangle_kernel(offsets)
        else:
            weights = _keys_kernel(offsets, _KEYS_A_ANTIALIAS)
        m[i, lo:hi] = weights / weights.sum(dtype=dtype)
    return m


def interpolation_matrix(
    size_in: int,
    size_out: int,
    method: Method = "bilinear",
    *,
    align_corners: bool = False,
    antialias: bool = False,
    dtype=np.float32,
) -> np.ndarray:
    """The (size_out, size_in) matrix that resizes one axis as `F.interpolate(size=...)` does."""
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {METHODS}")
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be positive, got {size_in} -> {size_out}")
    if antialias and align_corners:
        raise ValueError("antialias=True is only supported with align_corners=False")
    dtype = np.dtype(dtype).type
    if size_in == size_out:  # an exact identity in every mode, in torch as well
        return np.eye(size_in, dtype=dtype)
    if antialias:
        return _antialias_matrix(size_in, size_out, method, dtype)
    if method == "bilinear":
        return _bilinear_matrix(size_in, size_out, align_corners, dtype)
    return _bicubic_matrix(size_in, size_out, align_corners, dtype)


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def resize(
    x: Float[Array, "b h w *c"],
    size: int | tuple[int, int],
    method: Method = "bilinear",
    *,
    align_corners: bool = False,
    antialias: bool = False,
) -> Float[Array, "b oh ow *c"]:
    """Resize axes 1 and 2 of `x` (NHWC images or (b, h, w) maps) to `size` = (oh, ow) or an int.

    Matches `torch.nn.functional.interpolate(x_nchw, size=size, mode=method,
    align_corners=align_corners, antialias=antialias)`: bilinear or bicubic (A = -0.75, clamped
    taps), no antialiasing unless asked for."""
    if x.ndim not in (3, 4):
        raise ValueError(
            f"expected (batch, height, width) or (batch, height, width, channels), got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
    out_h, out_w = _size_pair(size)
    dtype = np.float64 if x.dtype == jnp.float64 else np.float32
    options = dict(align_corners=align_corners, antialias=antialias, dtype=dtype)
    rows = interpolation_matrix(x.shape[1], out_h, method, **options)
    cols = interpolation_matrix(x.shape[2], out_w, method, **options)
    precision = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ih,bhw...->biw...", jnp.asarray(rows, x.dtype), x, precision=precision)
    return jnp.einsum("jw,biw...->bij...", jnp.asarray(cols, x.dtype), y, precision=precision)
