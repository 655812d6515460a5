"""Guided backpropagation (Springenberg et al.): the input gradient through guided ReLUs."""

from __future__ import annotations

from typing import Literal

import jax
from jaxtyping import Array, Float

from jaxattr import maps
from jaxattr.config import Config, config, static
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, input_gradients, require_model, resolve_targets
from jaxattr.methods.base import MethodSpec, register, run_compiled


@config
class GuidedBackpropConfig(Config):
    output: Output = static("logit")
    # "guided_relu": ReLU/ReLU6 rule only (captum's GuidedBackprop); "guided" adds GNL's max-pool rule.
    nonlinearity: Literal["guided_relu", "guided"] = static("guided_relu")


@jax.jit
def _guided_backprop(model, images, targets, key, config: GuidedBackpropConfig):
    del key
    targets = resolve_targets(model, images, targets)
    _, grads = input_gradients(model.with_nonlinearity(config.nonlinearity), images, targets, config.output)
    return grads


def guided_backprop(
    model, images: Float[Array, "b h w 3"], targets=None, *, config: GuidedBackpropConfig = GuidedBackpropConfig(), key=None
) -> Float[Array, "b h w 3"]:
    """The input gradient with guided backward rules for each image's target (default: its prediction)."""
    model = require_model(model, "guided_backprop", "switches the model's ReLU backward rules")
    return run_compiled(_guided_backprop, GuidedBackpropConfig, model, images, targets, config=config, key=key)


register(
    MethodSpec(
        "guided_backprop",
        guided_backprop,
        GuidedBackpropConfig,
        "input gradient with guided ReLU backward rules",
        saliency=maps.abs_sum,
        contrast=Contrast("min", 99.0),
        needs_model=True,
    )
)
