"""Grad-CAM (Selvaraju et al.) at any tapped layer, CNN feature maps or ViT tokens."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr import heatmaps
from jaxattr.methods._common import Output, attribution_method, require_model, resolve_targets, target_scores
from jaxattr.methods.registry import MethodInfo, register_method
from jaxattr.models import Model, model_info


@dataclasses.dataclass(frozen=True)
class GradCamConfig:
    layer: str | None = None  # None: the model's last spatial feature map (ModelInfo.feature_layer)
    output: Output = "logit"
    relu: bool = True  # Grad-CAM's ReLU; captum's LayerGradCam leaves it off by default


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


def default_layer(model: Model) -> str:
    layer = model_info(model.name).feature_layer if model.name else ""
    if not layer:
        raise ValueError(f"no default Grad-CAM layer for {model.name or 'this model'}: set config.layer")
    return layer


@attribution_method(GradCamConfig)
def gradcam(forward, images, targets, key, *, config: GradCamConfig) -> Float[Array, "b h w"]:
    """sum_c (mean_hw d score / d A_c) A_c at the layer's resolution (upsample for display)."""
    del key
    model = require_model(forward, "gradcam")
    activation, head = model.tap(images, config.layer or default_layer(model))
    targets = resolve_targets(model, images, targets)
    scores, vjp = jax.vjp(lambda a: target_scores(head, a, targets, config.output), activation)
    (grads,) = vjp(jnp.ones_like(scores))
    activation, grads = tokens_to_grid(activation), tokens_to_grid(grads)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)
    cam = jnp.sum(weights * activation, axis=-1)
    return jax.nn.relu(cam) if config.relu else cam


register_method(
    MethodInfo("gradcam", gradcam, GradCamConfig, heatmaps.min_max, "Grad-CAM at a feature layer", needs_tap=True)
)
