"""Attributions -> 2-D heatmaps in [0, 1], batch first (PAIR saliency's and GNL's conventions).

Constant maps give zeros instead of the references' 0/0 NaN."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def _safe_ratio(num: Array, den: Array) -> Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.zeros_like(num))


def grayscale(attributions: Float[Array, "b h w c"], percentile: float = 99.0) -> Float[Array, "b h w"]:
    """PAIR `VisualizeImageGrayscale`: sum_c |a|, scaled from its minimum to its 99th percentile."""
    m = jnp.sum(jnp.abs(attributions), axis=-1)
    vmax = jnp.percentile(m, percentile, axis=(1, 2), keepdims=True)
    vmin = jnp.min(m, axis=(1, 2), keepdims=True)
    return jnp.clip(_safe_ratio(m - vmin, vmax - vmin), 0.0, 1.0)


def diverging(attributions: Float[Array, "b h w c"], percentile: float = 99.0) -> Float[Array, "b h w"]:
    """PAIR `VisualizeImageDiverging`: sum_c a mapped so that 0 -> 0.5 and +-span -> 1 / 0.

    As in the reference code, values below -span go negative (down to -1)."""
    m = jnp.sum(attributions, axis=-1)
    span = jnp.abs(jnp.percentile(m, percentile, axis=(1, 2), keepdims=True))
    return jnp.clip(_safe_ratio(m + span, 2 * span), -1.0, 1.0)


def abs_channel_sum(attributions: Float[Array, "b h w c"], percentile: float = 100.0) -> Float[Array, "b h w"]:
    """GNL's heatmap: |sum_c a| (sum over channels, then abs) divided by its maximum.

    percentile < 100 divides by that percentile instead and clips at 1, PAIR's display contrast:
    the few extreme pixels of an IG map would otherwise leave the rest near 0."""
    m = jnp.abs(jnp.sum(attributions, axis=-1))
    scale = jnp.percentile(m, percentile, axis=(1, 2), keepdims=True)
    return jnp.clip(_safe_ratio(m, scale), 0.0, 1.0)


def min_max(maps: Float[Array, "b h w"]) -> Float[Array, "b h w"]:
    """Scale each map to [0, 1] (Grad-CAM style)."""
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    hi = jnp.max(maps, axis=(1, 2), keepdims=True)
    return _safe_ratio(maps - lo, hi - lo)
