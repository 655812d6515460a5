"""Guided Integrated Gradients (Kapishnikov et al., 2021) as PAIR saliency 0.2.1 computes it.

The path starts at the baseline and, at each of `steps` steps, moves the features with the
smallest |gradient| towards the input until the L1 distance to the input has shrunk by
1/steps of its total; `max_dist` bounds how far a feature's progress alpha may stray from the
straight line's. The gradient is taken once per step, at its start, and weights every move of
the step (a left rule: sum attr ~ f(x) - f(baseline)).

The reference branches on exact float comparisons (saturation x == x_max, ties at the quantile
threshold, isclose at 1e-9), so tiny gradient differences change the path: the port follows its
operation order and agrees to ~1e-16 in float64. Computation runs in the images' dtype (the
reference always uses float64; pass float64 images with x64 enabled for parity). In float32 the
branching makes results differ from float64 by up to a few per cent at the defaults.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattr import maps
from jaxattr.config import Config, config, number, pass_count, static, traced
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, input_gradients, resolve_targets
from jaxattr.methods.base import MethodSpec, register, run_compiled
from jaxattr.methods.baselines import Baseline, baseline_images, broadcast_baselines

# PAIR's math.isclose(l1_target, l1_current, rel_tol=1e-9, abs_tol=1e-9).
_CLOSE = 1e-9


@config
class GuidedIGConfig(Config):
    steps: int = static(200, pass_count())  # outer steps, one gradient each
    # Share of features (lowest |gradient|) moved per move: static, it fixes the quantile's index.
    fraction: float = static(0.25, number(0, 1))
    # Max deviation of a feature's alpha from the straight line's (0: IG; 1: free).
    max_dist: float = traced(0.02, number(0, 1))
    baseline: Baseline = static("black")  # a `baselines=` array overrides it
    output: Output = static("logit")  # differentiate the target's logit or its softmax probability

    def needs_key(self) -> bool:
        return self.baseline == "uniform"


def _isclose(a: Array, b: Array) -> Array:
    return jnp.abs(a - b) <= jnp.maximum(_CLOSE * jnp.maximum(jnp.abs(a), jnp.abs(b)), _CLOSE)


def _lower_quantile(values: Array, fraction: float) -> Array:
    """NumPy's quantile(values, fraction, method='lower') over all entries, +inf included."""
    index = math.floor((values.size - 1) * fraction)  # NumPy's float64 floor((n - 1) * q)
    return jnp.sort(values.ravel())[index]


def _guided_step(
    inputs: Float[Array, "*f"],
    baselines: Float[Array, "*f"],
    point: Float[Array, "*f"],
    attributions: Float[Array, "*f"],
    gradient: Float[Array, "*f"],
    l1_total: Float[Array, ""],
    alpha: Float[Array, ""],
    max_dist: Float[Array, ""],
    *,
    fraction: float,
) -> tuple[Float[Array, "*f"], Float[Array, "*f"]]:
    """One outer step for one input: move `point` until its L1 distance to the input is
    l1_total * (1 - alpha). Returns the new point and attributions."""
    alpha_min = jnp.maximum(alpha - max_dist, 0.0)
    alpha_max = jnp.minimum(alpha + max_dist, 1.0)
    span = inputs - baselines
    point_min = baselines + span * alpha_min
    point_max = baselines + span * alpha_max
    l1_target = l1_total * (1 - alpha)
    varies = span != 0

    def move(state):
        point, candidates, attributions, _, moves = state
        before = point  # snapshot before the catch-up: the step's gradient weights the catch-up too
        # Features with input == baseline count as at alpha_max (they always equal point_max too).
        progress = jnp.where(varies, (point - baselines) / jnp.where(varies, span, 1), alpha_max)
        point = jnp.where(progress < alpha_min, point_min, point)
        l1_current = jnp.sum(jnp.abs(point - inputs))
        reached = _isclose(l1_target, l1_current)
        # Saturated features (exactly at point_max) get |g| = inf: excluded from now on in this step.
        candidates = jnp.where(point == point_max, jnp.inf, candidates)
        threshold = _lower_quantile(jnp.abs(candidates), fraction)
        selected = (jnp.abs(candidates) <= threshold) & (candidates != jnp.inf)  # ties all selected
        l1_selected = jnp.sum(jnp.where(selected, jnp.abs(point - point_max), 0))
        has_room = l1_selected > 0
        gamma = jnp.where(has_room, (l1_current - l1_target) / jnp.where(has_room, l1_selected, 1), jnp.inf)
        # gamma > 1: the selection cannot close the gap, move it all the way to point_max.
        moved = jnp.where(gamma > 1, point_max, point + (point_max - point) * gamma)
        point = jnp.where(selected & ~reached, moved, point)
        attributions = attributions + (point - before) * gradient
        return point, candidates, attributions, ~reached & (gamma > 1), moves + 1

    # Every move that does not end the step saturates at least one more feature, so the
    # reference ends within size + 1 moves; where it would loop forever (nothing left to
    # select, target not reached) this bound stops.
    max_moves = inputs.size + 1

    def keep_moving(state):
        return state[3] & (state[4] < max_moves)

    state = (point, gradient, attributions, jnp.array(True), jnp.array(0))
    point, _, attributions, _, _ = jax.lax.while_loop(keep_moving, move, state)
    return point, attributions


def guided_ig_path_attributions(
    gradients: Callable[[Array], Array],
    inputs: Float[Array, "b *f"],
    baselines: Float[Array, "b *f"],
    config: GuidedIGConfig = GuidedIGConfig(),
) -> Float[Array, "b *f"]:
    """Guided IG of any batch of inputs; `gradients(points) -> d output / d points` (batch in, batch out).

    Uses config's steps, fraction and max_dist (baseline and output concern the model method).
    Each input follows its own path (its moves are vmapped); the gradients of a step are
    evaluated for the whole batch at once. Computed in the inputs' dtype."""
    if inputs.shape != baselines.shape:
        raise ValueError(f"baselines must have the inputs' shape {inputs.shape}, got {baselines.shape}")
    dtype = inputs.dtype
    baselines = baselines.astype(dtype)
    l1_total = jnp.sum(jnp.abs(inputs - baselines), axis=tuple(range(1, inputs.ndim)))
    per_input_step = jax.vmap(
        functools.partial(_guided_step, fraction=config.fraction), in_axes=(0, 0, 0, 0, 0, 0, None, None)
    )
    max_dist = jnp.asarray(config.max_dist, dtype)

    def step(carry, index):
        point, attributions = carry
        alpha = (index.astype(dtype) + 1) / config.steps
        gradient = gradients(point).astype(dtype)
        return per_input_step(inputs, baselines, point, attributions, gradient, l1_total, alpha, max_dist), None

    (_, attributions), _ = jax.lax.scan(step, (baselines, jnp.zeros_like(inputs)), jnp.arange(config.steps))
    return attributions


@jax.jit
def _guided_ig(forward, images, targets, key, config: GuidedIGConfig, baselines):
    targets = resolve_targets(forward, images, targets)
    if baselines is None:
        baselines = baseline_images(config.baseline, forward, images, key=key)
    return guided_ig_path_attributions(
        lambda points: input_gradients(forward, points, targets, config.output)[1],
        images,
        broadcast_baselines(baselines, images),
        config,
    )


def guided_ig(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    baselines: Float[Array, "*f"] | None = None,
    config: GuidedIGConfig = GuidedIGConfig(),
    key: jax.Array | None = None,
) -> Float[Array, "b h w 3"]:
    """Guided IG of each image's target (default: its predicted class).

    `baselines`: an optional array broadcastable to the images (per image, one image, a colour);
    otherwise `config.baseline` names one (PAIR's default is black; 'uniform' needs `key`)."""
    return run_compiled(_guided_ig, GuidedIGConfig, model, images, targets, config=config, key=key, baselines=baselines)


register(
    MethodSpec(
        "guided_ig",
        guided_ig,
        GuidedIGConfig,
        "Guided Integrated Gradients (PAIR saliency): an adaptive path moving low-gradient features first",
        saliency=maps.abs_sum,
        contrast=Contrast("min", 99.0),
        takes_baselines=True,
    )
)
