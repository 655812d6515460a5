"""Baselines of the path methods, in pixel space: named ones and user arrays."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr.blur import gaussian_blur
from jaxattr.methods._common import Forward, image_keys
from jaxattr.models import Model

Baseline = Literal["black", "mean", "blur", "uniform"]
BASELINES: tuple[str, ...] = ("black", "mean", "blur", "uniform")


def check_baseline(kind: str) -> None:
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES} (or pass an array)")


def baseline_images(
    kind: Baseline,
    forward: Forward | None,
    images: Float[Array, "b h w c"],
    *,
    key: jax.Array | None = None,
    blur_sigma: float = 50.0,
) -> Float[Array, "b h w c"]:
    """A baseline per image, in pixel space.

    'black' zeros; 'mean' the model's mean colour, i.e. zero in the model's normalised space (what
    captum and GNL use on normalised inputs; needs a jaxattr Model); 'blur' the image blurred with
    SciPy's zero-padded Gaussian at `blur_sigma` (Blur IG's fully blurred end); 'uniform' U(0, 1)
    noise drawn per image from `key` (an image draws the same noise in any batch)."""
    check_baseline(kind)
    if kind == "black":
        return jnp.zeros_like(images)
    if kind == "mean":
        if not isinstance(forward, Model):
            raise TypeError(
                f"baseline 'mean' reads the model's normalisation mean: pass a jaxattr Model, "
                f"got {type(forward).__name__}"
            )
        return jnp.broadcast_to(jnp.asarray(forward.mean, images.dtype), images.shape)
    if kind == "blur":
        return gaussian_blur(images, blur_sigma)
    if key is None:
        raise ValueError("baseline 'uniform' is random: pass key=jax.random.key(seed)")
    keys = image_keys(key, images.shape[0])
    return jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:], images.dtype))(keys)


def broadcast_baselines(baselines: Any, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """A user-supplied baseline array broadcast to the images: (b, h, w, c), (1, h, w, c), (h, w, c),
    a colour (c,) or a scalar."""
    baselines = jnp.asarray(baselines, images.dtype)
    try:
        return jnp.broadcast_to(baselines, images.shape)
    except ValueError:
        raise ValueError(
            f"baselines of shape {baselines.shape} do not broadcast to the images' shape {images.shape}"
        ) from None
