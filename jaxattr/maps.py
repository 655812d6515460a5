"""Attributions -> saliency maps: one unclipped 2-D map per image, what metrics rank.

A method's saliency map reduces its raw attributions over channels (or passes a map through)
without any display contrast: no percentile clipping, no scaling. Display contrast is a separate,
declared `Contrast` that only `jaxattr.viz` applies when drawing.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr.resize import resize


def abs_sum(attributions: Float[Array, "b h w c"]) -> Float[Array, "b h w"]:
    """Σ_c |a|: PAIR saliency's magnitude map (`VisualizeImageGrayscale` before its contrast)."""
    return jnp.sum(jnp.abs(attributions), axis=-1)


def abs_of_sum(attributions: Float[Array, "b h w c"]) -> Float[Array, "b h w"]:
    """|Σ_c a|: GNL's heatmap before its division by the maximum."""
    return jnp.abs(jnp.sum(attributions, axis=-1))


def channel_sum(attributions: Float[Array, "b h w c"]) -> Float[Array, "b h w"]:
    """Σ_c a, signed (PAIR's diverging map before its contrast)."""
    return jnp.sum(attributions, axis=-1)


def identity(maps: Float[Array, "b h w"]) -> Float[Array, "b h w"]:
    """For methods whose attributions already are a map (Grad-CAM)."""
    return maps


@dataclasses.dataclass(frozen=True)
class Contrast:
    """How a saliency map is scaled to [0, 1] for display: (m - floor) / (upper - floor), clipped,
    with floor the map's minimum or zero and upper its `percentile`-th percentile.

    PAIR's grayscale contrast is Contrast("min", 99); GNL's division by the maximum is
    Contrast("zero", 100); Grad-CAM's min-max scaling Contrast("min", 100)."""

    floor: Literal["min", "zero"] = "min"
    percentile: float = 99.0


def upsample(maps: Float[Array, "b h w"], size: tuple[int, int], method: Literal["bilinear", "bicubic"]) -> Float[Array, "b H W"]:
    """Maps resized to `size` as torch's interpolate (align_corners=False) resizes them; maps of
    that size already are returned as they are."""
    return maps if maps.shape[1:3] == tuple(size) else resize(maps, size, method)
