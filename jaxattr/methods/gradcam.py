"""Grad-CAM (Selvaraju et al.) at any layer, CNN feature maps or ViT tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr import maps
from jaxattr.config import Config, config, name, optional, static
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, require_model, resolve_targets, target_scores
from jaxattr.methods.base import MethodSpec, register, run_compiled
from jaxattr.models import Model


@config
class GradCamConfig(Config):
    layer: str | None = static(None, optional(name()))  # None: the model's default feature layer (`Model.feature_layer`)
    output: Output = static("logit")
    relu: bool = static(True)  # Grad-CAM's ReLU; captum's LayerGradCam leaves it off by default


def tokens_to_grid(x: Array) -> Float[Array, "b h w d"]:
    """Feature maps pass through; ViT tokens (b, n, d) become a grid without the class token."""
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise ValueError(f"Grad-CAM needs a feature map (b, h, w, c) or tokens (b, n, d), got shape {x.shape}")
    n = x.shape[1]
    for skip in (1, 0):  # class token first, as in torchvision and timm ViTs
        side = math.isqrt(n - skip)
        if side * side == n - skip:
            return x[:, skip:].reshape(x.shape[0], side, side, x.shape[2])
    raise ValueError(f"cannot arrange {n} tokens on a square grid")


def feature_layer(model: Model, layer: str | None) -> str:
    """`layer`, or the model's default feature layer, resolved to a stage name."""
    layer = layer or model.feature_layer
    if not layer:
        raise ValueError(f"{model.name or 'this model'} declares no default feature layer: set config.layer")
    return model.resolve_layer(layer)


@jax.jit
def _gradcam(model, images, targets, key, config: GradCamConfig):
    del key
    activation, head = model.tap(images, feature_layer(model, config.layer))
    targets = resolve_targets(model, images, targets)
    scores, vjp = jax.vjp(lambda a: target_scores(head, a, targets, config.output), activation)
    (grads,) = vjp(jnp.ones_like(scores))
    activation, grads = tokens_to_grid(activation), tokens_to_grid(grads)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)
    cam = jnp.sum(weights * activation, axis=-1)
    return jax.nn.relu(cam) if config.relu else cam


def gradcam(
    model: Model, images: Float[Array, "b h w 3"], targets=None, *, config: GradCamConfig = GradCamConfig(), key=None
) -> Float[Array, "b h w"]:
    """sum_c (mean_hw d score / d A_c) A_c at the layer's resolution (`jaxattr.explain` upsamples)."""
    model = require_model(model, "gradcam", "taps a layer")
    feature_layer(model, config.layer)  # an unknown or missing layer fails here, not in the trace
    return run_compiled(_gradcam, GradCamConfig, model, images, targets, config=config, key=key)


register(
    MethodSpec(
        "gradcam",
        gradcam,
        GradCamConfig,
        "Grad-CAM at a feature layer",
        saliency=maps.identity,
        contrast=Contrast("min", 100.0),
        needs_model=True,
    )
)
