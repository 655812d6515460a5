"""Plain gradients: the saliency map (Simonyan et al.) and gradient x input."""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from jaxattr import heatmaps
from jaxattr.methods._common import Output, attribution_method, input_gradients, resolve_targets
from jaxattr.methods.registry import MethodInfo, register_method


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
