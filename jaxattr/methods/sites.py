"""Gradients at a model's intervention sites (stage outputs, a ViT block's attention): the
building block of methods that integrate over internal representations (IIA, attention rollout)."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxattr.methods._common import Output, check_inputs, require_model
from jaxattr.models import Model
from jaxattr.scores import select_scores


def site_gradients(
    model: Model,
    images: Float[Array, "b h w 3"],
    targets: Int[Array, " b"],
    sites: Sequence[str],
    *,
    replace: Mapping[str, Array] | None = None,
    output: Output = "logit",
) -> tuple[Float[Array, "b k"], dict[str, Array], dict[str, Array]]:
    """(logits, {site: value}, {site: d score / d value}) for every site in `sites`, in one forward
    and one backward pass. The score is each image's target logit (or softmax probability).

    `replace` puts constants in place of some sites first (their values are reported as given, and
    their gradient is the gradient with respect to the given array). Images do not interact, so
    the gradient of the summed scores is each image's own gradient. Traceable: call it inside jit."""
    require_model(model, "site_gradients", "differentiates at the model's sites")
    check_inputs(images, targets)
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), images.shape[:1])
    sites = [model.resolve_site(s) for s in sites]
    _, shapes = jax.eval_shape(lambda x: model.intervene(x, replace=replace, read=sites), images)
    zeros = {s: jnp.zeros(shape.shape, shape.dtype) for s, shape in shapes.items()}

    def summed_scores(perturbations):
        logits, values = model.intervene(images, replace=replace, perturb=perturbations, read=sites)
        return select_scores(logits, targets, output).sum(), (logits, values)

    grads, (logits, values) = jax.grad(summed_scores, has_aux=True)(zeros)
    return logits, values, grads
