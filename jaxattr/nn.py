"""Building blocks shared by the torch ports: torch-compatible layers and guided non-linearities.

Parameter names follow torch's, so a Flax parameter path joined with '.' is the torch state_dict
key; the one renamed leaf is `kernel` (the transposed torch `weight`, see `jaxattr.models.weights`).

Non-linearity modes (a model option; the forward pass is the same in every mode):
  "standard"     ordinary gradients.
  "guided"       the GNL rules: guided-backprop ReLU/ReLU6 and the GNL max-pool mask rule.
  "guided_relu"  guided-backprop ReLU/ReLU6 only, max-pool unchanged (captum's GuidedBackprop).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jaxtyping import Array, Float

Nonlinearity = Literal["standard", "guided", "guided_relu"]
NONLINEARITIES: tuple[str, ...] = ("standard", "guided", "guided_relu")


def check_nonlinearity(mode: str) -> str:
    if mode not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {mode!r}; expected one of {NONLINEARITIES}")
    return mode


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------- layers


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one axis, as explicit (low, high) amounts: the total pads the
    output to ceil(size / stride), the odd cell going to the high side (timm's Conv2dSame)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_conv_by_shifts(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw 1 c"],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Float[Array, "b h2 w2 c"]:
    """A depthwise convolution (one filter per channel) as the sum of kh x kw strided views of the
    padded input, each scaled by one kernel tap. XLA:CPU runs grouped convolutions as a generic
    loop; this form fuses into one elementwise pass and is 10-40x faster forward and backward on
    EfficientNet's depthwise shapes (measured at batch 4, 224 px). Other platforms keep the
    native convolution (`Conv2d` picks per platform)."""
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (padded.shape[1] - kh) // sh + 1
    out_w = (padded.shape[2] - kw) // sw + 1
    taps = [
        padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :] * kernel[i, j, 0]
        for i in range(kh)
        for j in range(kw)
    ]
    return functools.reduce(jnp.add, taps)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _convolution(x, kernel, strides, padding, groups=1):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_NHWC, feature_group_count=groups
    )


def pointwise_conv_as_dot(
    x: Float[Array, "b h w c"], kernel: Float[Array, "1 1 c f"], strides: tuple[int, int]
) -> Float[Array, "b h2 w2 f"]:
    """A 1x1 convolution without padding (groups 1) as one matrix product over the channels,
    the stride taken by slicing first. XLA:CPU runs it 1.1-3x faster than the convolution
    library (forward and input gradient), and inside loops its gradient needs no kernel
    relayout (see `conv_with_flipped_backward`)."""
    sh, sw = strides
    return jax.lax.dot_general(x[:, ::sh, ::sw, :], kernel[0, 0], (((3,), (0,)), ((), ())))


def conv_by_columns(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw c f"],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Float[Array, "b h2 w2 f"]:
    """A convolution (groups 1) as one matrix product: the kh x kw strided views of the padded
    input side by side on the channel axis (kh*kw*c columns per output cell) times the kernel's
    (kh*kw*c, f) matrix; its gradient is a product and shifted adds, no convolution. For
    activations smaller than the kernel window (ResNet's last stage at 64 px: 2x2 cells under a
    3x3 kernel), where XLA swaps a convolution's operands into a form its CPU convolution
    library rejects (reversed window, batch-minor layout) and runs it as generic loops, several
    times slower than this product."""
    kh, kw, c, f = kernel.shape
    sh, sw = strides
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (padded.shape[1] - kh) // sh + 1
    out_w = (padded.shape[2] - kw) // sw + 1
    views = [
        padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    columns = jnp.concatenate(views, axis=-1)  # row-major (i, j, channel), as the kernel's reshape
    return jax.lax.dot_general(columns, kernel.reshape(kh * kw * c, f), (((3,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_with_flipped_backward(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw c f"],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Float[Array, "b h2 w2 f"]:
    """A convolution (groups 1) whose input gradient is itself a forward convolution with an
    explicitly flipped HWIO kernel (stride: input dilation). JAX's own transpose rule swaps the
    kernel's feature dimensions instead; XLA:CPU then relayouts the kernel before calling its
    convolution library, except inside loops (lax.scan over chunks of path points), where it
    keeps the swapped layout, which the library rejects, and falls back to generic loops
    several times slower."""
    return _convolution(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
    return _convolution(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    if kernel.shape[2] < _FEW_CHANNELS and strides == (1, 1):
        dx = _input_gradient_by_columns(g, kernel, x.shape, padding)
    elif kernel.shape[2] < _FEW_CHANNELS:
        dx = _input_gradient_by_space_to_depth(g, kernel, x.shape, strides, padding)
    else:
        dx = _input_gradient(g, kernel, x.shape, strides, padding)
    # The kernel's gradient by JAX's own rule: attribution methods never ask for it, and XLA
    # then drops it.
    _, kernel_vjp = jax.vjp(lambda k: _convolution(x, k, strides, padding), kernel)
    return dx, kernel_vjp(g)[0]


def _input_gradient(g, kernel, x_shape, strides, padding):
    # Input cell p receives g[o] * kernel[p + low - o * stride]: a correlation of the
    # stride-dilated g, padded by (k - 1 - low) below, with the spatially flipped kernel.
    transposed_padding = tuple(
        (k - 1 - low, n + low - (o - 1) * s - 1)
        for n, o, k, s, (low, _) in zip(x_shape[1:3], g.shape[1:3], kernel.shape[:2], strides, padding)
    )
    swapped = kernel.swapaxes(2, 3)
    correlate = functools.partial(jax.lax.conv_general_dilated, lhs_dilation=strides, dimension_numbers=_NHWC)
    # One form for every batch size (flipping g and the result instead is faster for deep layers
    # at small batches, but rounds differently): an image's map must not depend on how many
    # images share its batch, or a resumed run would not reproduce an uninterrupted one bit for bit.
    return correlate(g, jnp.flip(swapped, (0, 1)), (1, 1), transposed_padding)


# Convolutions reading fewer channels than this (the first layer, on RGB pixels) take their
# input gradient in forms other than a correlation with a 3-channel output, which XLA:CPU runs
# at a fraction of its convolution library's speed (measured at batch 8, 224 px: VGG's first
# layer 1.5x, ResNet's 7x7 stem 1.9x faster).
_FEW_CHANNELS = 16


def _input_gradient_by_columns(g, kernel, x_shape, padding):
    """A stride-1 convolution's input gradient as one matrix product, g times the kernel's
    (kh*kw*c, f) matrix, giving each output cell's contribution to every input cell of its
    window (a few channels each), then those contributions summed into place: kh*kw shifted
    adds."""
    (kh, kw, c, f), (h, w) = kernel.shape, x_shape[1:3]
    b, oh, ow, _ = g.shape
    columns = jax.lax.dot_general(g, kernel.reshape(kh * kw * c, f), (((3,), (1,)), ((), ())))
    columns = columns.reshape(b, oh, ow, kh, kw, c)
    zero = jnp.zeros((), g.dtype)
    total = jnp.zeros((b, h, w, c), g.dtype)
    for i in range(kh):
        for j in range(kw):
            # Output cell o reads input cell o + i - low through tap (i, j).
            low_h, low_w = i - padding[0][0], j - padding[1][0]
            placement = ((0, 0, 0), (low_h, h - low_h - oh, 0), (low_w, w - low_w - ow, 0), (0, 0, 0))
            total = total + jax.lax.pad(columns[:, :, :, i, j, :], zero, placement)
    return total


def _input_gradient_by_space_to_depth(g, kernel, x_shape, strides, padding):
    """A stride-s convolution is a stride-1 convolution of the padded input rearranged into
    s x s blocks (space to depth, s*s*c channels) with the kernel zero-padded to a multiple of s
    and rearranged alike; its input gradient is that stride-1 convolution's (a correlation with
    the flipped kernel, or a matrix product when the kernel is one block: ViT's patches),
    rearranged back (depth to space) and cropped to the unpadded input."""
    (kh, kw, c, f), (sh, sw) = kernel.shape, strides
    bh, bw = -(-kh // sh), -(-kw // sw)  # the kernel's extent in blocks
    blocks = jnp.pad(kernel, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0), (0, 0)))
    blocks = blocks.reshape(bh, sh, bw, sw, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(bh, bw, sh * sw * c, f)
    if (bh, bw) == (1, 1):
        grad = jax.lax.dot_general(g, blocks[0, 0], (((3,), (1,)), ((), ())))
    else:
        flipped = jnp.flip(blocks, (0, 1)).swapaxes(2, 3)
        grad = jax.lax.conv_general_dilated(
            g, flipped, (1, 1), ((bh - 1, bh - 1), (bw - 1, bw - 1)), dimension_numbers=_NHWC
        )
    b, rows, cols, _ = grad.shape
    grad = grad.reshape(b, rows, cols, sh, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, rows * sh, cols * sw, c)
    # `grad` is with respect to the padded input's first rows*sh x cols*sw cells; the rest of
    # the padded input is read by no window.
    (h, w), (top, _), (left, _) = x_shape[1:3], *padding
    grad = jnp.pad(grad, ((0, 0), (0, max(top + h - rows * sh, 0)), (0, max(left + w - cols * sw, 0)), (0, 0)))
    return grad[:, top : top + h, left : left + w, :]


conv_with_flipped_backward.defvjp(_conv_fwd, _conv_bwd)


def _cpu_convolution(x, kernel, strides, padding, groups):
    """The forms XLA:CPU runs fastest (each measured against the plain convolution)."""
    kh, kw, _, features = kernel.shape
    if groups == x.shape[-1] == features:
        return depthwise_conv_by_shifts(x, kernel, strides, padding)
    if groups > 1:
        return _convolution(x, kernel, strides, padding, groups)
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        return pointwise_conv_as_dot(x, kernel, strides)
    out_cells = math.prod((n + sum(p) - k) // s + 1 for n, p, k, s in zip(x.shape[1:3], padding, (kh, kw), strides))
    if out_cells < kh * kw:  # the forward or input-gradient convolution would get swapped operands
        return conv_by_columns(x, kernel, strides, padding)
    return conv_with_flipped_backward(x, kernel, strides, padding)


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC input, groups, bias, with explicit padding: symmetric amounts as
    torch takes them, or "tf_same" for ports of TensorFlow-trained weights (timm's Conv2dSame),
    computed from the static input shape (never Flax's 'SAME', whose placement differs).

    On CPU, depthwise, 1x1 and other ungrouped convolutions take the forms XLA:CPU runs fastest
    (`_cpu_convolution`); other platforms compile the plain convolution, unchanged."""

    features: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | Literal["tf_same"] = 0
    groups: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        kh, kw = _pair(self.kernel_size)
        strides = _pair(self.stride)
        if self.padding == "tf_same":
            pads = tuple(tf_same_padding(n, k, s) for n, k, s in zip(x.shape[1:3], (kh, kw), strides))
        else:
            ph, pw = _pair(self.padding)
            pads = ((ph, ph), (pw, pw))
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (kh, kw, x.shape[-1] // self.groups, self.features),
        ).astype(x.dtype)
        y = jax.lax.platform_dependent(
            x,
            kernel,
            cpu=functools.partial(_cpu_convolution, strides=strides, padding=pads, groups=self.groups),
            default=functools.partial(_convolution, strides=strides, padding=pads, groups=self.groups),
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class Linear(nn.Module):
    """torch.nn.Linear; `kernel` is the transposed torch weight."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... f"]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = x @ kernel.astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d in eval mode (running statistics, no batch coupling).

    The statistics live in the `params` collection under torch's names: inference never updates
    them, and one collection keeps a model a single pytree."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        scale = weight * jax.lax.rsqrt(var + self.eps)
        return ((x - mean) * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, two-pass variance as torch computes it."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        d = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        return (centred * jax.lax.rsqrt(var + self.eps) * weight + bias).astype(x.dtype)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU as torch.nn.GELU(); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


# ------------------------------------------------------------------------------- non-linearities


def _standard_relu(x: Array) -> Array:
    # where(x > 0) has gradient 0 at exactly 0, as torch; jnp.maximum(x, 0) would give 0.5.
    return jnp.where(x > 0, x, jnp.zeros_like(x))


def _standard_relu6(x: Array) -> Array:
    # torch's hardtanh backward passes the gradient only where 0 < x < 6.
    return jnp.where(x > 0, jnp.where(x < 6, x, jnp.full_like(x, 6)), jnp.zeros_like(x))


@jax.custom_vjp
def _guided_relu(x: Array) -> Array:
    return _standard_relu(x)


def _guided_relu_fwd(x):
    return _standard_relu(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@jax.custom_vjp
def _guided_relu6(x: Array) -> Array:
    return _standard_relu6(x)


def _guided_relu6_fwd(x):
    return _standard_relu6(x), x


def _guided_relu6_bwd(x, g):
    return (jnp.where((x > 0) & (x < 6) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu6.defvjp(_guided_relu6_fwd, _guided_relu6_bwd)


def relu(x: Array, nonlinearity: str = "standard") -> Array:
    """ReLU whose backward rule follows the model's non-linearity mode."""
    return _standard_relu(x) if nonlinearity == "standard" else _guided_relu(x)


def relu6(x: Array, nonlinearity: str = "standard") -> Array:
    """ReLU6 (clip to [0, 6]); guided modes keep only positive gradients inside (0, 6)."""
    return _standard_relu6(x) if nonlinearity == "standard" else _guided_relu6(x)


# ------------------------------------------------------------------------------------- pooling


def _pool_padding(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding reproducing torch's output size, ceil_mode included.

    torch: out = floor_or_ceil((size + 2p - k) / s) + 1, and with ceil_mode the last window must
    start inside the input or the left padding. The extra cells are -inf, so they never win."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    if out < 1:  # torch raises too; reduce_window would silently return an empty array
        raise ValueError(
            f"max_pool2d: input size {size} is too small for kernel {kernel}, stride {stride}, padding {pad} "
            "(the output would be empty); use larger images"
        )
    high = (out - 1) * stride + kernel - size - pad
    return pad, max(high, pad) if ceil_mode else pad


class _PoolGeometry(NamedTuple):
    """A max-pool's static shape: input (height, width), window, strides and (low, high) padding
    per axis, torch's output size included (see `_pool_padding`)."""

    size: tuple[int, int]
    window: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]

    @property
    def out(self) -> tuple[int, int]:
        return tuple((n + sum(p) - k) // s + 1 for n, k, s, p in zip(self.size, self.window, self.strides, self.padding))

    def tap_masks(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Static masks of one axis, shape (kernel, out): tap k of output cell o reads an input
        cell (not padding); and it is the first tap of that window that does."""
        n, k, s, (low, _) = self.size[axis], self.window[axis], self.strides[axis], self.padding[axis]
        position = np.arange(k)[:, None] + s * np.arange(self.out[axis])[None, :] - low
        valid = (position >= 0) & (position < n)
        return valid, valid & (np.cumsum(valid, axis=0) == 1)


def _max_pool_with_taps(x: Array, pool: _PoolGeometry) -> tuple[Array, Array]:
    """(max-pool values, uint8 row-major index of the winning tap in each kh x kw window), from
    the strided views of the padded input, by torch's CPU rule: the window's first input cell
    (row-major, padding excluded) starts the maximum, and a later cell replaces it only if
    strictly greater or NaN. So the first of tied maxima wins, an all -inf window routes to its
    first input cell, and padding never wins. One fused elementwise pass."""
    (kh, kw), (sh, sw), (oh, ow) = pool.window, pool.strides, pool.out
    row_valid, row_first = pool.tap_masks(0)
    col_valid, col_first = pool.tap_masks(1)
    padded = jnp.pad(x, ((0, 0), *pool.padding, (0, 0)), constant_values=-np.inf)
    best = jnp.full((x.shape[0], oh, ow, x.shape[3]), -np.inf, x.dtype)
    tap = jnp.zeros(best.shape, jnp.uint8)
    for i in range(kh):
        for j in range(kw):
            view = padded[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
            valid = np.outer(row_valid[i], col_valid[j])[:, :, None]
            first = np.outer(row_first[i], col_first[j])[:, :, None]
            if first.all():  # tap (0, 0) of an unpadded pool
                best, tap = view, jnp.full(view.shape, i * kw + j, jnp.uint8)
                continue
            wins = (view > best) | jnp.isnan(view)
            if not valid.all():
                wins = wins & valid
            if first.any():
                wins = wins | first
            best = jnp.where(wins, view, best)
            tap = jnp.where(wins, jnp.uint8(i * kw + j), tap)
    return best, tap


def _route_to_taps(g: Array, tap: Array, pool: _PoolGeometry) -> Array:
    """The max-pool input gradient: each output cell's gradient added into the input cell that
    its window's winning tap read. Tap t's gradients are placed by `lax.pad` (interior padding
    stride - 1, the pool's own padding cropped by negative edge padding), and the taps are added
    in reverse order, so that every input cell sums its gradients in output row-major order as
    torch's CPU backward does: bit-identical to torch, overlapping windows included."""
    (h, w), (kh, kw), (sh, sw), (oh, ow) = pool.size, pool.window, pool.strides, pool.out
    zero = jnp.zeros((), g.dtype)
    total = jnp.zeros((g.shape[0], h, w, g.shape[3]), g.dtype)
    for t in reversed(range(kh * kw)):
        i, j = divmod(t, kw)
        low_h, low_w = i - pool.padding[0][0], j - pool.padding[1][0]
        placement = (
            (0, 0, 0),
            (low_h, h - low_h - sh * (oh - 1) - 1, sh - 1),
            (low_w, w - low_w - sw * (ow - 1) - 1, sw - 1),
            (0, 0, 0),
        )
        total = total + jax.lax.pad(jnp.where(tap == t, g, zero), zero, placement)
    return total


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Legacy nearest-neighbour source index floor(i * out / in) for each of the `size_in` rows."""
    return (np.arange(size_in) * size_out) // size_in


def _pack_taps(tap: Array) -> Array:
    """Tap indices (< 256) packed four to an int32 word along the channel axis. The packing is a
    reduction, which XLA:CPU materialises where it would otherwise fuse (and so recompute) the
    whole comparison chain of `_max_pool_with_taps` into each of the backward pass's kh*kw
    reads of a tap (ResNet stem pool backward, batch 8: 285 ms instead of 3.5 ms)."""
    words = jnp.pad(tap, ((0, 0),) * 3 + ((0, -tap.shape[-1] % 4),)).reshape(*tap.shape[:-1], -1, 4)
    return jnp.sum(words.astype(jnp.int32) << _TAP_SHIFTS, axis=-1)


def _unpack_taps(words: Array, channels: int) -> Array:
    taps = (words[..., None] >> _TAP_SHIFTS) & 0xFF
    return taps.reshape(*words.shape[:-1], -1)[..., :channels]


_TAP_SHIFTS = np.array([0, 8, 16, 24], np.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: Array, pool: _PoolGeometry, guided: bool) -> Array:
    """Max-pool with a torch-exact backward. JAX's own gradient of reduce_window is a
    select-and-scatter that XLA:CPU expands into an argmax reduce-window, int32 index arrays and
    a scatter (~25% of ResNet-18's time); here the forward keeps the winning taps (one byte per
    output) and the backward only selects and pads. `guided`: the GNL rule (gnl.md 2.4)."""
    return _max_pool_with_taps(x, pool)[0]


def _max_pool_fwd(x, pool, guided):
    y, tap = _max_pool_with_taps(x, pool)
    return y, _pack_taps(tap)


def _max_pool_bwd(pool, guided, packed_taps, g):
    routed = _route_to_taps(g, _unpack_taps(packed_taps, g.shape[-1]), pool)
    if guided:
        # The routed gradient times the indicator of a positive upstream gradient, taken from
        # output cell (floor(i*Ho/Hi), floor(j*Wo/Wi)) for input cell (i, j).
        (hi, wi), (ho, wo) = pool.size, pool.out
        positive = (g > 0).astype(g.dtype)
        routed = routed * positive[:, _nearest_indices(hi, ho)][:, :, _nearest_indices(wi, wo)]
    return (routed,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool2d(
    x: Float[Array, "b h w c"],
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
    nonlinearity: str = "standard",
) -> Float[Array, "b h2 w2 c"]:
    """torch.nn.MaxPool2d, values and gradients bit-identical to torch's CPU kernels (the first
    maximum wins ties); the GNL backward rule in "guided" mode."""
    window = _pair(kernel_size)
    strides = _pair(stride if stride is not None else kernel_size)
    if window[0] * window[1] > 256:  # the winning tap is kept in one byte
        raise ValueError(f"max_pool2d: a {window[0]}x{window[1]} window has more than 256 cells, which is not supported")
    padding_hw = tuple(
        _pool_padding(size, k, s, p, ceil_mode)
        for size, k, s, p in zip(x.shape[1:3], window, strides, _pair(padding))
    )
    return _max_pool(x, _PoolGeometry(tuple(x.shape[1:3]), window, strides, padding_hw), nonlinearity == "guided")


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row i averages input cells [floor(i*in/out), ceil((i+1)*in/out)), torch's adaptive rule."""
    m = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool2d(
    x: Float[Array, "b h w c"], output_size: int | tuple[int, int]
) -> Float[Array, "b oh ow c"]:
    """torch.nn.AdaptiveAvgPool2d for any input size (output cells may overlap or repeat)."""
    oh, ow = _pair(output_size)
    h, w = x.shape[1:3]
    if (oh, ow) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    if (oh, ow) == (h, w):
        return x
    ph = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)
