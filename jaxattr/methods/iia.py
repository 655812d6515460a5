"""IIA, Iterated Integrated Attributions (Barkan et al., ICCV 2023), for CNNs and ViTs.

Two nested path integrals: an image path from the zero of the model's normalised space (the mean
colour) to the image and, at every image point, a path over an internal representation
(iia.md). The model decides the variant: a model with attention sites (a ViT) integrates
attention, any other model a layer's activations.

CNN (iia.md §2). With A_k the activation at `layer` of the image point x_k = α_k·x (x normalised,
α_k = float32 linspace(0, 1, K+1)) and G = ∂logit/∂(activation) through the model's head:
* mode='reference' (default) reproduces the authors' code, whose activation path is degenerate
  (its baseline is a minimum over a singleton axis, so only the path's first point, the
  activation itself, contributes):  H = Σ_k Σ_c relu(A_k,c) ⊙ G(A_k)_c;
* mode='integrated' is the genuinely iterated integral (not in the reference, §2.5): baseline
  B = min_k A_k elementwise, W_km = B + β_m(A_k - B) with β_m = float32 linspace(0, 1, M+1),
  H = Σ_k Σ_m Σ_c relu(W_km,c) ⊙ G(W_km)_c.
The 7x7 (layer resolution) map H is resized to the image bicubically, exactly as torch does.
The reference's other CNN operations ('iia-triple', the ablations, the single-step map; §2.4)
are not offered.

ViT (iia.md §3). At each image point x_a the attention of the path block (default: the last)
is replaced by the constant β·A_L(x_a) (so no gradient reaches that block's queries and keys),
and every block's attention gets cam_b = relu(∂logit/∂A_b ⊙ A_b) per head; the cams are averaged
over the (K+1)(M+1) points (a, β), and attention rollout (head mean, identity added,
row-normalised, product over the blocks) gives the class token's row without itself: a
token-grid map, resized bilinearly (align_corners=False) to the image.

What is returned. The reference's output is the resized map min-max normalised to [0, 1]. `iia`
returns the resized map *before* that normalisation: the method's raw attribution (b, H, W),
keeping its scale and sign; `jaxattr.maps.min_max(iia(...))` is the reference's map
(a constant map gives zeros instead of the reference's NaN). It is also the saliency map metrics
rank (min-max and the segmentation protocol's mean threshold are affine-invariant), and the
display contrast is the min-max. `iia_layer_maps` returns the map at the layer's (CNN) or the
token grid's (ViT) resolution, before resizing.

Cost: CNN (K+1)·b forward passes to the layer, plus (K+1)·b (reference) or (K+1)(M+1)·b
(integrated) head backward passes; ViT (K+1)·b forward passes through the blocks before the path
block, shared by its M+1 attention points, and (K+1)(M+1)·b passes through the rest of the model
and back. `chunk` image points are evaluated per batch (each with all its activation/attention
points): memory, never results.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxattr import maps, paths
from jaxattr.config import Config, config, integer, name, optional, pass_count, static
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, check_inputs, require_model, resolve_targets, target_scores
from jaxattr.methods.base import MethodSpec, register, run_compiled
from jaxattr.methods.gradcam import feature_layer
from jaxattr.models import Head, Model
from jaxattr.models.vit import attention_sites
from jaxattr.resize import resize
from jaxattr.scores import select_scores

Mode = Literal["reference", "integrated"]

# The reference's path lengths (intervals; each path has one point more, both ends included).
CNN_STEPS = 10  # INTERPOLATION_STEPS, cnn_saliency_map_generator.py
VIT_STEPS = 5  # ITERATION_STEPS, vit_saliency_map_generator.py


@config
class IIAConfig(Config):
    """The reference's settings; None picks the reference's value for the model's family."""

    # CNN: the layer whose activations are integrated (None: the model's feature layer, ResNet
    # layer4). ViT: the block whose attention is on the path, by block or attention-site name
    # (None: the last block, the reference's).
    layer: str | None = static(None, optional(name()))
    # Image path: steps + 1 points (None: 10 for CNNs, 5 for ViTs).
    steps: int | None = static(None, optional(pass_count()))
    # CNNs only: 'reference' (the authors' degenerate activation integral) or 'integrated'.
    mode: Mode = static("reference")
    # Inner path: activation_steps + 1 points. CNN mode='integrated' (None: 10); ViT attention path
    # (None: 5). No effect in the CNN reference mode, which uses one point.
    activation_steps: int | None = static(None, optional(pass_count()))
    # Image points per batch, each with all its inner points: memory, never results. None: every
    # point at once for CNNs (forward passes only), one point per batch for ViTs.
    chunk: int | None = static(None, optional(integer(1)))
    output: Output = static("logit")  # the reference explains the target's logit


def path_nodes(steps: int) -> np.ndarray:
    """The reference's interpolation coefficients: float32 NumPy linspace(0, 1, steps + 1)."""
    return np.linspace(0, 1, steps + 1, dtype=np.float32)


def vit_attention_sites(model: Model) -> tuple[str, ...]:
    """The model's attention sites in block order; () for a model without attention (a CNN): what
    decides the variant."""
    try:
        return attention_sites(model)
    except TypeError:
        return ()


def path_block(model: Model, sites: tuple[str, ...], layer: str | None) -> int:
    """Index of the ViT block whose attention is interpolated (`IIAConfig.layer`)."""
    if layer is None:
        return len(sites) - 1
    for index, site in enumerate(sites):
        if layer in (site, model.module.block_name(index)):
            return index
    raise ValueError(
        f"IIA on a ViT interpolates one block's attention: layer must name a block or its attention site, "
        f"got {layer!r}; attention sites: {', '.join(sites)}"
    )


def _check(model: Model, images: Array, config: IIAConfig) -> None:
    """Eager checks at the public boundary (shapes are static: no computation)."""
    check_inputs(images, None)
    sites = vit_attention_sites(model)
    if sites:
        if config.mode != "reference":
            raise ValueError(
                f"mode={config.mode!r} is the CNN activation-path option; a ViT's attention path is always "
                "integrated (activation_steps sets its length): leave mode at 'reference'"
            )
        path_block(model, sites, config.layer)
        jax.eval_shape(model, images)  # a ViT made for another image size says so here
        return
    layer = feature_layer(model, config.layer)
    if config.mode == "reference" and config.activation_steps is not None:
        raise ValueError(
            "activation_steps has no effect in mode='reference' (the reference's activation integral is "
            "degenerate: one point); set mode='integrated' to integrate along the activations"
        )
    _, shapes = jax.eval_shape(model.activations, images)
    if len(shapes[layer].shape) != 4:
        spatial = [name for name in model.layers if len(shapes[name].shape) == 4]
        raise ValueError(
            f"layer {layer}'s output has shape {shapes[layer].shape}, not a feature map (batch, height, width, "
            f"channels); IIA integrates a spatial layer's activations: one of {', '.join(spatial)}"
        )


# ------------------------------------------------------------------------------------------ CNN


def _relu_times_gradient(head: Head, activations: Array, targets: Array, output: Output) -> Float[Array, "n h w"]:
    """Σ_c relu(W_c) ⊙ ∂score/∂W_c at the activations W (one backward pass through the head)."""
    scores, vjp = jax.vjp(lambda a: target_scores(head, a, targets, output), activations)
    (grads,) = vjp(jnp.ones_like(scores))
    return jnp.sum(jax.nn.relu(activations) * grads, axis=-1)


def _cnn_map(model: Model, x: Array, targets: Array, config: IIAConfig) -> Float[Array, "b h w"]:
    layer = feature_layer(model, config.layer)
    head = Head(model, layer)
    b = x.shape[0]
    alphas = jnp.asarray(path_nodes(config.steps or CNN_STEPS))

    def activations(alpha):  # (c,) image points -> their activations (c, b, h, w, C)
        points = (alpha[:, None, None, None, None] * x[None]).reshape(-1, *x.shape[1:])
        a, _ = model.tap(points, layer, normalised=True)
        return a.reshape(alpha.shape[0], b, *a.shape[1:])

    def summed_terms(w):  # (p, b, h, w, C) activation points -> Σ_p Σ_c relu(W)·G, (b, h, w)
        flat = w.reshape(-1, *w.shape[2:])
        terms = _relu_times_gradient(head, flat, jnp.tile(targets, w.shape[0]), config.output)
        return jnp.sum(terms.reshape(w.shape[0], b, *terms.shape[1:]), axis=0)

    if config.mode == "reference":
        return paths.chunked_sum(lambda alpha: summed_terms(activations(alpha)), alphas, chunk=config.chunk)
    acts = paths.chunked_map(activations, alphas, chunk=config.chunk)
    base = jnp.min(acts, axis=0)
    betas = jnp.asarray(path_nodes(config.activation_steps or CNN_STEPS), acts.dtype)

    def integrated(a):  # (c, b, h, w, C) -> W = B + β(A - B) for every β, summed terms
        w = base[None, None] + betas[:, None, None, None, None, None] * (a - base)[None]
        return summed_terms(w.reshape(-1, *a.shape[1:]))

    return paths.chunked_sum(integrated, acts, chunk=config.chunk)


# ------------------------------------------------------------------------------------------ ViT


def _zeros_at(model: Model, sites, inputs: Array, **run) -> dict[str, Array]:
    """Zero perturbations for `sites` (their gradients are the gradients at the sites)."""
    _, shapes = jax.eval_shape(lambda x: model.intervene(x, read=sites, **run), inputs)
    return {s: jnp.zeros(v.shape, v.dtype) for s, v in shapes.items()}


def _vit_cams(
    model: Model, x: Array, targets: Array, sites: tuple[str, ...], config: IIAConfig
) -> Float[Array, "blocks b heads n n"]:
    """Σ over the (a, β) path points of relu(∂score/∂A_b ⊙ A_b), every block b, per head."""
    path = path_block(model, sites, config.layer)
    block = model.module.block_name(path)
    start = model.layers[model.layers.index(block) - 1]  # the stage feeding the path block
    before, after = sites[:path], sites[path:]
    b = x.shape[0]
    betas = jnp.asarray(path_nodes(config.activation_steps or VIT_STEPS))
    m = betas.shape[0]

    def cams(alpha):  # (c,) image points -> their cams summed over the points and all β
        c = alpha.shape[0]
        points = (alpha[:, None, None, None, None] * x[None]).reshape(c * b, *x.shape[1:])
        # The blocks before the path block do not depend on β: one forward pass per image point,
        # kept (vjp) for the backward passes of all its attention points.
        trunk = functools.partial(model.intervene, points, read=before, stop=start, normalised=True)
        offsets = _zeros_at(model, before, points, stop=start, normalised=True)
        tokens, trunk_vjp, attention_before = jax.vjp(lambda p: trunk(perturb=p), offsets, has_aux=True)
        _, own = model.intervene(tokens, start=start, stop=block, read=[sites[path]])
        # All (β, point) pairs as one batch, β-major; `split` puts β first again.
        split = lambda a: a.reshape(m, c * b, *a.shape[1:])
        fixed = betas[:, None, None, None, None] * own[sites[path]][None]
        fixed = fixed.reshape(m * c * b, *fixed.shape[2:])
        repeated = jnp.broadcast_to(tokens[None], (m, *tokens.shape)).reshape(m * c * b, *tokens.shape[1:])
        repeated_targets = jnp.tile(targets, m * c)

        def tail(tokens, perturbations):
            logits, values = model.intervene(
                tokens, start=start, replace={sites[path]: fixed}, perturb=perturbations, read=after
            )
            return select_scores(logits, repeated_targets, config.output).sum(), values

        zeros = {s: jnp.zeros_like(fixed) for s in after}
        (token_grads, grads_after), attention_after = jax.grad(tail, (0, 1), has_aux=True)(repeated, zeros)
        # Each β's gradient at the tokens, back through the trunk pass: gradients before the block.
        grads_before = jax.vmap(lambda g: trunk_vjp(g)[0])(split(token_grads))

        def summed(grads, values):  # (β, point·image, ...) -> relu(G ⊙ A) summed over β and points
            cam = jax.nn.relu(grads * values)
            return jnp.sum(cam.reshape(m * c, b, *cam.shape[2:]), axis=0)

        per_site = {s: summed(grads_before[s], attention_before[s][None]) for s in before}
        per_site |= {s: summed(split(grads_after[s]), split(attention_after[s])) for s in after}
        return jnp.stack([per_site[s] for s in sites])

    alphas = jnp.asarray(path_nodes(config.steps or VIT_STEPS))
    return paths.chunked_sum(cams, alphas, chunk=config.chunk or 1)


def rollout(attention: Float[Array, "blocks b heads n n"]) -> Float[Array, "b n"]:
    """Attention rollout (head mean, identity added, rows normalised, J = M̃_last ⋯ M̃_0) and the
    class token's row of J: relevance of every token (the class token's own entry first)."""
    fused = jnp.mean(attention, axis=2)
    augmented = fused + jnp.eye(fused.shape[-1], dtype=fused.dtype)
    augmented = augmented / jnp.sum(augmented, axis=-1, keepdims=True)
    matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    joint = functools.reduce(lambda j, layer: matmul(layer, j), augmented[1:], augmented[0])
    return joint[:, 0]


def _vit_map(
    model: Model, x: Array, targets: Array, sites: tuple[str, ...], config: IIAConfig
) -> Float[Array, "b g g"]:
    points = (config.steps or VIT_STEPS) + 1
    inner = (config.activation_steps or VIT_STEPS) + 1
    relevance = rollout(_vit_cams(model, x, targets, sites, config) / (points * inner))[:, 1:]
    side = math.isqrt(relevance.shape[-1])
    return relevance.reshape(-1, side, side)


# ------------------------------------------------------------------------------------ the method


@jax.jit
def _iia_layer_maps(model, images, targets, key, config: IIAConfig):
    del key
    targets = resolve_targets(model, images, targets)
    x = model.normalise(images)  # paths start at zero in the normalised space, in float32
    sites = vit_attention_sites(model)
    return _vit_map(model, x, targets, sites, config) if sites else _cnn_map(model, x, targets, config)


@jax.jit
def _iia(model, images, targets, key, config: IIAConfig):
    layer_maps = _iia_layer_maps(model, images, targets, key, config)
    # The reference's resizers: bicubic for CNN maps, bilinear for ViT token grids.
    return resize(layer_maps, images.shape[1:3], "bilinear" if vit_attention_sites(model) else "bicubic")


def iia(
    model: Model, images: Float[Array, "b h w 3"], targets=None, *, config: IIAConfig = IIAConfig(), key=None
) -> Float[Array, "b h w"]:
    """IIA map of each image's target (default: its predicted class) at the images' resolution,
    before the reference's min-max normalisation (`jaxattr.maps.min_max` applies it).

    A ViT (a model with attention sites) integrates its attention, any other model the
    activations at `config.layer`. Deterministic: `key` is accepted and unused."""
    model = require_model(model, "iia", "integrates over the model's activations or attention")
    _check(model, images, config)
    return run_compiled(_iia, IIAConfig, model, images, targets, config=config, key=key)


def iia_layer_maps(
    model: Model, images: Float[Array, "b h w 3"], targets=None, *, config: IIAConfig = IIAConfig(), key=None
) -> Float[Array, "b h2 w2"]:
    """`iia` before resizing: at the layer's resolution (CNN, e.g. 7x7 for ResNet layer4 at 224 px)
    or on the token grid (ViT, 14x14 for patch 16 at 224 px)."""
    model = require_model(model, "iia_layer_maps", "integrates over the model's activations or attention")
    _check(model, images, config)
    return run_compiled(_iia_layer_maps, IIAConfig, model, images, targets, config=config, key=key)


# --------------------------------------------------------------------- segmentation protocol


def unnormalised_inputs(model: Model, images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
    """The pixel images whose normalisation is `images` itself: mean + std·images.

    IIA's COCO segmentation scripts (iia.md §4.1) feed the images to the ImageNet-normalised
    model *without* normalising them, a probable bug that changes the reported numbers. jaxattr
    models normalise inside, so explaining `unnormalised_inputs(model, images)` reproduces that
    input (the values leave [0, 1]; only the reference protocol's COCO option uses this)."""
    mean = jnp.asarray(model.module.mean, images.dtype)
    std = jnp.asarray(model.module.std, images.dtype)
    return images * std + mean


register(
    MethodSpec(
        "iia",
        iia,
        IIAConfig,
        "Iterated Integrated Attributions: image path x activation (CNN) or attention (ViT) path",
        saliency=maps.identity,  # already at the images' resolution: explain does not resize it
        contrast=Contrast("min", 100.0),  # the reference's min-max
        upsample="bicubic",
        needs_model=True,
    )
)
