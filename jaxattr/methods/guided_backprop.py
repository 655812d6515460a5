"""Guided backpropagation (Springenberg et al.): the input gradient through guided ReLUs."""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from jaxattr import heatmaps
from jaxattr.methods._common import Output, attribution_method, input_gradients, require_model, resolve_targets
from jaxattr.methods.registry import MethodInfo, register_method


@dataclasses.dataclass(frozen=True)
class GuidedBackpropConfig:
    output: Output = "logit"
    # "guided_relu": ReLU/ReLU6 rule only (captum's GuidedBackprop); "guided" adds GNL's max-pool rule.
    nonlinearity: str = "guided_relu"


@attribution_method(GuidedBackpropConfig)
def guided_backprop(forward, images, targets, key, *, config: GuidedBackpropConfig) -> Float[Array, "b h w c"]:
    del key
    model = require_model(forward, "guided_backprop")
    targets = resolve_targets(model, images, targets)
    _, grads = input_gradients(model.with_nonlinearity(config.nonlinearity), images, targets, config.output)
    return grads


register_method(
    MethodInfo(
        "guided_backprop", guided_backprop, GuidedBackpropConfig, heatmaps.grayscale,
        "input gradient with guided ReLU backward rules", needs_tap=True,
    )
)
