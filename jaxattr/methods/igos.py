"""I-GOS, iGOS+ and iGOS++: saliency masks optimised with integrated gradients (igos.md).

I-GOS (Qi et al., AAAI 2020) looks for a small low-resolution mask M (s x s cells, 1 keeps the
image, 0 shows a blurred baseline) whose *deletion* lowers the target's softmax probability; iGOS++
(Khorram et al., CHIL 2021) adds an *insertion* mask and a bilateral smoothness term; iGOS+ is its
one-mask form. The descent direction is not the gradient of the objective but an integrated
gradient: the gradient of the mean score along the path from the baseline to the masked image,

    D(U) = sum_k p_c(phi(I, B, t_k U) + 0.2 eps_k) / N,    phi(X, Y, U) = X U + Y (1 - U),

with U the mask bilinearly upsampled (align_corners) and fresh noise eps at every evaluation
(igos.md §4). Everything happens in the model's normalised input space, as in the reference.

The optimiser is an optax chain. Per iteration the variant's direction g (path gradients plus the
regulariser's gradient, §6) is the "gradient" fed to

* `optimizer="ls"` (the reference's effective default):
  `chain(scale(-1), scale_by_projected_backtracking(alpha0, ...))`. The update is
  u = -g; the line search tries alpha = alpha0, alpha0 decay, ... on the *projected* point
  clip(M + alpha u, 0, 1) with fresh noise at every evaluation and accepts the first alpha with
  F(trial) <= F(M) + alpha beta <u, g> (Armijo, §8), or the last one tried once alpha < min_step;
  the chain returns alpha u;
* `optimizer="nag"` (§6.4): `chain(scale(-alpha0), scale_by_nesterov_extrapolation())`:
  theta_i = M_i - alpha0 g_i and M_{i+1} = theta_i + i/(i+3) (theta_i - theta_{i-1}).

and `M <- projection_box(apply_updates(M, updates), 0, 1)`: the paper's M <- clip(M - alpha g).
For the line search this is the reference's arithmetic to the bit (M + alpha (-g) == M - g alpha);
the NAG update is returned as a difference, so its iterate can differ from the reference's by an ulp.

One image's whole optimisation (a `lax.scan` over the T iterations, the line search a
`lax.while_loop`) is written for a single image and `vmap`ped over the batch: every image gets its
own step size, as in the reference (which loops over images for the gradients and evaluates the
line search on the still-active images only). Under vmap the while loop runs until the last image
has accepted its step; finished images keep their state.

Reproduced quirks (igos.md §1): T = 20 iterations and N = 15 integration steps (the reference's
CLI swaps the two names), alpha0 = 1000, the line search always on; iGOS++'s direction halves its
four path gradients while its line-search objective does not; its regulariser sees the product
Md Mi of the low-resolution masks; the bilateral TV's channel asymmetry. Fixed: the line search
has the semantics of the pinned torch 1.7.1 (it crashes on torch >= 2 once every active image is
accepted at once).

Numerics (§12): |x| has derivative sign(x) (0 at 0, as torch), so the L1 term's gradient is 0 at
the initial all-ones mask; upsampling is torch-exact (`jaxattr.resize`); phi, the noise and the
p / N terms are computed in the reference's order (a true division); the integration nodes are
float32 `linspace(1/N, 1, N)` (the 'igos' rule of `jaxattr.paths`); the clamp is applied outside
autodiff; step sizes are float32 as in the reference, whatever the masks' dtype.

The registered methods return the map 1 - up(mask) at image resolution: the reference's masks are
low where the image matters, the flipped map is high there, so every consumer (overlays, RISE-style
metrics sorting in descending order) reads it as "salient = hot". The masks themselves (low =
salient), the baselines and the optimisation trace come from `igos_masks`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from jaxattr import maps, paths
from jaxattr.blur import AxisBlur, blur_axes, blur_matrix
from jaxattr.config import Config, ConfigError, config, integer, number, optional, pass_count, static, traced
from jaxattr.maps import Contrast
from jaxattr.methods._common import check_inputs, image_keys, predicted_classes, require_model
from jaxattr.methods.base import MethodSpec, register, run_compiled
from jaxattr.methods.baselines import broadcast_baselines
from jaxattr.resize import resize

Variant = Literal["igos", "igos_plus", "igos_pp"]
VARIANTS: tuple[str, ...] = ("igos", "igos_plus", "igos_pp")

# --------------------------------------------------------------------------------------- configs


@config
class IGOSConfig(Config):
    """I-GOS with the reference's effective settings (igos.md §1-2: what its main.py runs)."""

    iterations: int = static(20, pass_count())  # T: optimisation iterations (the reference's --ig_iter)
    steps: int = static(15, pass_count())  # N: integration steps of each path score (its --iterations)
    mask_size: int = static(28, integer(2))  # s: the mask has s x s cells
    l1: float = traced(1.0, number(0))  # lambda1: weight of mean |1 - mask|
    l2: float = traced(20.0, number(0))  # lambda2: weight of TV (I-GOS) or bilateral TV (iGOS+/++)
    # Initial line-search step, NAG's fixed step: the reference's --alpha (in `jaxattr explain`,
    # --alpha is the overlay opacity, hence the name).
    alpha0: float = traced(1000.0, number(0, 1e30, exclusive_minimum=True))
    noise: float = traced(0.2, number(0))  # std of the noise added to every path image (normalised space)
    optimizer: Literal["ls", "nag"] = static("ls")  # Armijo line search, or Nesterov with fixed alpha0
    armijo: float = traced(1e-4, number(0))  # sufficient-decrease coefficient beta
    decay: float = traced(0.2, number(0, 1, exclusive_minimum=True))  # step factor per failed trial, < 1
    min_step: float = traced(1e-5, number(1e-30))  # the search stops after trying a step below this
    # Side of the baseline's Gaussian blur kernel (sigma = side - 1); None: the reference's rule on
    # the larger image side (51 below 500 px, 151 below 800, else 201).
    blur_kernel: int | None = static(None, optional(integer(1)))
    # Path nodes per model batch: memory, never results. None: all N nodes at once (the reference).
    chunk: int | None = static(None, optional(integer(1)))

    def validate_fields(self) -> None:
        if self.decay >= 1:
            raise ConfigError("decay", f"decay must be < 1 so the line search ends, got {self.decay}")
        if self.blur_kernel is not None and self.blur_kernel % 2 == 0:
            raise ConfigError("blur_kernel", f"blur_kernel must be odd, got {self.blur_kernel}")


@config
class IGOSPlusConfig(IGOSConfig):
    """iGOS+ and iGOS++: I-GOS's settings and the bilateral TV's edge scale (igos.md §5)."""

    btv_sigma: float = traced(0.01, number(0, exclusive_minimum=True))  # on squared normalised differences


# ---------------------------------------------------------------------------------- the baseline


def blur_kernel_size(size: int) -> int:
    """The reference's blur kernel side for images of `size` pixels (igos.md §3)."""
    return 51 if size < 500 else 151 if size < 800 else 201


def igos_baselines(images: Float[Array, "b h w 3"], kernel: int | None = None) -> Float[Array, "b h w 3"]:
    """I-GOS's blurred baselines in pixel space (igos.md §3): OpenCV's `GaussianBlur` with a
    kernel x kernel window, sigma = kernel - 1 and BORDER_REFLECT_101, on 8-bit values.

    SciPy's Gaussian with mode 'mirror' and truncate 0.5 has the same window and weights, applied
    here as one plain matmul per axis (the result is rounded to 8-bit levels as the reference's
    uint8 output is, so `gaussian_blur`'s bit-exact float32 scheme would buy nothing). OpenCV's
    fixed-point arithmetic differs by one level in ~2.6 % of the pixels, and the reference blurs its
    bicubic rather than its bilinear resize (§12.8). `kernel` None: `blur_kernel_size` of the
    larger side."""
    kernel = blur_kernel_size(max(images.shape[1:3])) if kernel is None else kernel

    def axis(size: int) -> AxisBlur:
        matrix = blur_matrix(size, float(kernel - 1), mode="mirror", truncate=0.5)
        return AxisBlur(jnp.asarray(matrix, images.dtype), None)

    blurred = blur_axes(images, axis(images.shape[1]), axis(images.shape[2]))
    # levels / 255 as a true division: the values ToTensor (and jaxattr's image loader) give
    return paths.true_divide(jnp.round(jnp.clip(blurred, 0, 1) * 255), 255)


# ------------------------------------------------------------------------------ building blocks


@jax.custom_jvp
def abs_sign(x: Array) -> Array:
    """|x| whose derivative is sign(x), 0 at 0 as in torch (jnp.abs has derivative 1 at 0)."""
    return jnp.abs(x)


@abs_sign.defjvp
def _abs_sign_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


def upsample(masks: Float[Array, "*j s t"], size: tuple[int, int]) -> Float[Array, "*j h w"]:
    """Masks to image size as torch's UpsamplingBilinear2d (align_corners=True), for one mask
    (s, t) or a stack (j, s, t)."""
    if masks.ndim == 2:
        return resize(masks[None], size, "bilinear", align_corners=True)[0]
    return resize(masks, size, "bilinear", align_corners=True)


def l1_distance(mask: Float[Array, "s t"]) -> Float[Array, ""]:
    """mean |1 - M| (igos.md §5)."""
    return jnp.mean(abs_sign(1 - mask))


def total_variation(mask: Float[Array, "s t"]) -> Float[Array, ""]:
    """TV with beta = 2: the means of the squared vertical and of the squared horizontal
    differences, each over its own count. |d|^2 = d^2, whose gradient is 0 at d = 0 as torch's."""
    return jnp.mean(jnp.square(mask[:-1] - mask[1:])) + jnp.mean(jnp.square(mask[:, :-1] - mask[:, 1:]))


class EdgeWeights(NamedTuple):
    """The bilateral TV's image-edge weights (igos.md §5), from the normalised image."""

    vertical: Float[Array, "h-1 w"]  # exp(-(mean_c dI)^2 / sigma): channels averaged before squaring
    horizontal: Float[Array, "h w-1"]  # mean_c exp(-dI^2 / sigma): each channel exponentiated first

    @property
    def image_size(self) -> tuple[int, int]:
        return self.horizontal.shape[0], self.vertical.shape[1]


def edge_weights(image: Float[Array, "h w 3"], sigma: Float[Array, ""]) -> EdgeWeights:
    vertical = jnp.exp(-(jnp.mean(image[:-1] - image[1:], axis=-1) ** 2) / sigma)
    horizontal = jnp.mean(jnp.exp(-((image[:, :-1] - image[:, 1:]) ** 2) / sigma), axis=-1)
    return EdgeWeights(vertical, horizontal)


def bilateral_total_variation(mask: Float[Array, "s t"], weights: EdgeWeights) -> Float[Array, ""]:
    """BTV = (TV(M) + mean(wv dU_v^2) + mean(wh dU_h^2)) / 2 with U = up(M) (igos.md §5)."""
    up = upsample(mask, weights.image_size)
    vertical = jnp.mean(weights.vertical * jnp.square(up[:-1] - up[1:]))
    horizontal = jnp.mean(weights.horizontal * jnp.square(up[:, :-1] - up[:, 1:]))
    return 0.5 * (total_variation(mask) + vertical + horizontal)


# ------------------------------------------------------------------------------------ variants


class MaskPair(NamedTuple):
    """iGOS++'s two masks (a pytree: optax updates both, with one step size)."""

    deletion: Array
    insertion: Array


Masks = PyTree[Float[Array, "s s"]]  # one mask, or a MaskPair
Kind = Literal["deletion", "insertion"]  # D(U) = P(I, B, U) or J(U) = P(B, I, U)


@dataclasses.dataclass(frozen=True)
class VariantRules:
    """What distinguishes I-GOS, iGOS+ and iGOS++ (igos.md §6).

    The direction and the objective are sums of path scores ("terms"), each D or J of a
    full-resolution mask made from the low-resolution masks, listed in the order the reference
    draws their noise (§9); `combine` assembles the direction from the terms' gradients (leading
    term axis) and the regulariser's; the objective is the terms summed left to right with + for D
    and - for J (the insertion loss is -J), plus the regulariser."""

    gradient_kinds: tuple[Kind, ...]
    gradient_masks: Callable[[Masks, Callable], Array]  # (masks, up) -> (terms, h, w)
    objective_kinds: tuple[Kind, ...]
    objective_masks: Callable[[Masks, Callable], Array]
    combine: Callable[[Masks, Masks], Masks]  # (term gradients, regulariser gradient) -> direction
    bilateral: bool  # BTV (iGOS+/++) instead of TV (I-GOS)
    output: Callable[[Masks], Array]  # the returned mask; also what the regulariser sees
    two_masks: bool


def _pp_direction(terms: MaskPair, regulariser: MaskPair) -> MaskPair:
    # ((g1 - g2) + g3) / 2 and ((g1 - g2) - g4) / 2, then + the regulariser (methods.py:216-247).
    deletion = ((terms.deletion[0] - terms.deletion[1]) + terms.deletion[2]) / 2 + regulariser.deletion
    insertion = ((terms.insertion[0] - terms.insertion[1]) - terms.insertion[3]) / 2 + regulariser.insertion
    return MaskPair(deletion, insertion)


def _pp_masks(order: tuple[str, ...]) -> Callable[[MaskPair, Callable], Array]:
    def build(masks: MaskPair, up: Callable) -> Array:
        d, i = up(masks.deletion), up(masks.insertion)
        named = {"d": d, "i": i, "di": d * i}  # the product of the *upsampled* masks
        return jnp.stack([named[name] for name in order])

    return build


RULES: dict[str, VariantRules] = {
    "igos": VariantRules(
        gradient_kinds=("deletion",),
        gradient_masks=lambda m, up: up(m)[None],
        objective_kinds=("deletion",),
        objective_masks=lambda m, up: up(m)[None],
        combine=lambda terms, reg: reg + terms[0],
        bilateral=False,
        output=lambda m: m,
        two_masks=False,
    ),
    "igos_plus": VariantRules(
        gradient_kinds=("deletion", "insertion"),
        gradient_masks=lambda m, up: jnp.stack([up(m)] * 2),
        objective_kinds=("insertion", "deletion"),
        objective_masks=lambda m, up: jnp.stack([up(m)] * 2),
        combine=lambda terms, reg: (terms[0] - terms[1]) + reg,
        bilateral=True,
        output=lambda m: m,
        two_masks=False,
    ),
    "igos_pp": VariantRules(
        gradient_kinds=("deletion", "insertion", "deletion", "insertion"),
        gradient_masks=_pp_masks(("di", "di", "d", "i")),
        objective_kinds=("deletion", "insertion", "deletion", "insertion"),
        objective_masks=_pp_masks(("d", "i", "di", "di")),
        combine=_pp_direction,
        bilateral=True,
        output=lambda m: m.deletion * m.insertion,
        two_masks=True,
    ),
}


# ---------------------------------------------------------------------------------- the problem

NoiseFn = Callable[[jax.Array, Array, Array, tuple[int, ...], jnp.dtype], Array]


def gaussian_noise(key: jax.Array, iteration: Array, slot: Array, shape: tuple[int, ...], dtype) -> Array:
    """The default noise: eps ~ N(0, 1) of `shape` for draw `slot` of `iteration`, from the image's
    key. Slots number the draws of one iteration in the reference's order (igos.md §9): the
    direction's terms, then per objective evaluation (the base value, then each line-search trial)
    its terms; so a sequential stream that follows §9 (a PyTorch reference) can draw the same values.

    Drawn with JAX's classic (non-partitionable) threefry: under vmap with one key per image the
    partitionable variant compiles 4-5x slower (every draw site of the program pays it), while the
    classic one defines the same values on any device layout (it is only less parallel across
    devices, which per-image noise does not need)."""
    with jax.threefry_partitionable(False):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, iteration), slot), shape, dtype)


def zero_noise(key, iteration, slot, shape, dtype) -> Array:
    """No noise (for tests: the noiseless path scores of §4)."""
    return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One image's mask optimisation: its descent direction and objective (igos.md §6), with the
    noise of every evaluation. Arrays are one image's, in the model's normalised space."""

    rules: VariantRules
    forward: Callable[[Array], Array]  # normalised images (n, h, w, 3) -> logits
    image: Float[Array, "h w 3"]
    baseline: Float[Array, "h w 3"]
    target: Int[Array, ""]
    config: IGOSConfig
    key: jax.Array
    noise: NoiseFn = gaussian_noise

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[:2]

    def up(self, mask: Array) -> Array:
        return upsample(mask, self.size)

    def initial_masks(self) -> Masks:
        """Exactly 1 everywhere (igos.md §4)."""
        s = self.config.mask_size
        ones = jnp.ones((s, s), self.image.dtype)
        return MaskPair(ones, ones) if self.rules.two_masks else ones

    def regulariser(self, masks: Masks) -> Float[Array, ""]:
        """lambda1 L1 + lambda2 TV (I-GOS) or BTV (iGOS+/++), on the variant's output mask."""
        mask, dtype = self.rules.output(masks), self.image.dtype
        l1, l2 = jnp.asarray(self.config.l1, dtype), jnp.asarray(self.config.l2, dtype)
        if self.rules.bilateral:
            weights = edge_weights(self.image, jnp.asarray(self.config.btv_sigma, dtype))
            smoothness = bilateral_total_variation(mask, weights)
        else:
            smoothness = total_variation(mask)
        return l1 * l1_distance(mask) + l2 * smoothness

    def _draws(self, iteration: Array, first: Array, count: int) -> Float[Array, "n j h w 3"]:
        # The `count` draws of one evaluation as one (vmapped) call: one generator in the program.
        shape = (self.config.steps, *self.image.shape)
        slots = first + jnp.arange(count, dtype=jnp.int32)
        draws = jax.vmap(lambda slot: self.noise(self.key, iteration, slot, shape, self.image.dtype))(slots)
        return jnp.moveaxis(draws, 0, 1)  # node-major, for chunking over nodes

    def _path_sums(self, kinds: tuple[Kind, ...], masks: Array, eps: Array, gradient: bool):
        """(values (j,), d values / d masks (j, h, w) if `gradient`) of the terms P(X_j, Y_j, U_j):
        sum_k p_c(phi(X, Y, U t_k) + sigma eps_k) / N, the N nodes (chunked) of all terms in one
        model batch."""
        shown = jnp.stack([self.image if k == "deletion" else self.baseline for k in kinds])
        hidden = jnp.stack([self.baseline if k == "deletion" else self.image for k in kinds])
        steps, dtype = self.config.steps, self.image.dtype
        sigma = jnp.asarray(self.config.noise, dtype)

        def scores(masks, nodes, eps):
            u = masks[None, ..., None] * nodes[:, None, None, None, None]  # U t (n, j, h, w, 1)
            x = shown * u + hidden * (1 - u)
            x = x + eps * sigma
            logits = self.forward(x.reshape(-1, *x.shape[2:]))
            p = jax.nn.softmax(logits, axis=-1)[:, self.target].reshape(x.shape[:2])
            return jnp.sum(paths.true_divide(p, steps), axis=0)

        def part(chunk):
            if not gradient:
                return scores(masks, *chunk)
            values, vjp = jax.vjp(lambda m: scores(m, *chunk), masks)
            return values, vjp(jnp.ones_like(values))[0]

        nodes = jnp.asarray(paths.quadrature("igos", steps).nodes, dtype)
        return paths.chunked_sum(part, (nodes, eps), chunk=self.config.chunk)

    def direction(self, masks: Masks, iteration: Array) -> Masks:
        """The descent direction of `iteration` (draws 0 .. terms-1)."""
        rules = self.rules
        full, vjp = jax.vjp(lambda m: rules.gradient_masks(m, self.up), masks)
        eps = self._draws(iteration, jnp.int32(0), len(rules.gradient_kinds))
        _, grads = self._path_sums(rules.gradient_kinds, full, eps, gradient=True)
        # Each term's gradient with respect to the low-resolution masks: the upsampling's VJP of
        # that term's full-resolution gradient alone.
        one_term = jnp.where(jnp.eye(len(rules.gradient_kinds), dtype=bool)[:, :, None, None], grads[None], 0)
        terms = jax.vmap(lambda g: vjp(g)[0])(one_term)
        return rules.combine(terms, jax.grad(self.regulariser)(masks))

    def objective(self, masks: Masks, iteration: Array, evaluation: Array) -> Float[Array, ""]:
        """The line-search objective (igos.md §6), with the draws of `evaluation` (0: the base
        value, j: the j-th trial)."""
        rules = self.rules
        count = len(rules.objective_kinds)
        first = len(rules.gradient_kinds) + evaluation * count
        values = self._path_sums(rules.objective_kinds, rules.objective_masks(masks, self.up),
                                 self._draws(iteration, first, count), gradient=False)
        total = None
        for kind, value in zip(rules.objective_kinds, values):
            signed = value if kind == "deletion" else -value
            total = signed if total is None else total + signed
        return total + self.regulariser(masks)


# ---------------------------------------------------------------------------------- optimisers


def project_box(tree: PyTree[Array], lower: float, upper: float) -> PyTree[Array]:
    """Every leaf clipped to [lower, upper] (`optax.projections.projection_box` with scalar bounds)."""
    bound = lambda value: optax.tree.full_like(tree, value)
    return optax.projections.projection_box(tree, bound(lower), bound(upper))


class BacktrackingState(NamedTuple):
    step_size: Array  # the step of the last search (float32, as the reference's)
    value: Array  # the objective at the last search's starting point (its base value)
    trials: Array  # objective evaluations of the last search, base value excluded


def scale_by_projected_backtracking(
    initial_step: float | Array,
    slope_rtol: float | Array = 1e-4,
    decrease_factor: float | Array = 0.2,
    min_step: float | Array = 1e-5,
    lower: float = 0.0,
    upper: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Armijo backtracking on a box, with one step size for the whole parameter tree (I-GOS's line
    search, igos.md §8; vmap it for one step per example).

    Like `optax.scale_by_backtracking_linesearch`, `update(updates, state, params, *, grad,
    value_fn, value=None)` scales the descent `updates` by the step it finds. The differences are
    I-GOS's:

    * trial points are projected: clip(params + step updates, lower, upper);
    * every search starts at `initial_step` and multiplies by `decrease_factor` (float32) after
      each failure; a step is accepted when value_fn(trial) <= value + step (slope_rtol <updates,
      grad>), a NaN value counting as accepted; once a failed step is below `min_step` the search
      stops and that step is used anyway (there is no reject branch);
    * the objective is stochastic: `value_fn(params, evaluation)` gets the evaluation's number,
      so each one can draw its own noise: 0 is the base value value_fn(params), unless `value`
      gives it; 1, 2, ... are the trials.

    One `lax.while_loop` evaluates the base value and the trials (so the objective appears once in
    the compiled program); it ends because the step falls geometrically below `min_step`."""

    def init_fn(params) -> BacktrackingState:
        value = jax.eval_shape(lambda p: optax.tree.vdot(p, p), params)
        return BacktrackingState(
            jnp.asarray(initial_step, jnp.float32), jnp.full((), jnp.nan, value.dtype), jnp.zeros((), jnp.int32)
        )

    def update_fn(updates, state, params, *, grad, value_fn, value=None, **extra_args):
        del extra_args
        slope = optax.tree.vdot(updates, grad)
        tau = jnp.asarray(slope_rtol, slope.dtype) * slope
        decrease = jnp.asarray(decrease_factor, jnp.float32)
        smallest = jnp.asarray(min_step, jnp.float32)

        def point(step, evaluation):  # the base point, then the projected trials
            trial = project_box(optax.apply_updates(params, optax.tree.scale(step, updates)), lower, upper)
            return jax.tree_util.tree_map(lambda p, t: jnp.where(evaluation == 0, p, t), params, trial)

        def body(carry):
            step, base, _, evaluation = carry
            new_value = value_fn(point(step, evaluation), evaluation)
            first = evaluation == 0
            base = jnp.where(first, new_value, base).astype(base.dtype)
            searching = first | ((new_value > base + step * tau) & (step >= smallest))
            step = jnp.where(searching & ~first, step * decrease, step)
            return step, base, searching, evaluation + 1

        base = state.value if value is None else jnp.asarray(value, state.value.dtype)
        start = (jnp.asarray(initial_step, jnp.float32), base, jnp.asarray(True), jnp.int32(0 if value is None else 1))
        step, base, _, evaluations = jax.lax.while_loop(lambda carry: carry[2], body, start)
        return optax.tree.scale(step, updates), BacktrackingState(step, base, evaluations - 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class NesterovState(NamedTuple):
    count: Array  # i
    previous: optax.Params  # theta_{i-1}, not projected


def scale_by_nesterov_extrapolation() -> optax.GradientTransformation:
    """The reference's Nesterov step (igos.md §6.4) after a fixed-step descent update u_i:
    theta_i = params_i + u_i, next = theta_i + i / (i + 3) (theta_i - theta_{i-1}), theta_{-1} = 0;
    returns next - params_i. theta is kept unprojected; project the parameters after applying."""

    def init_fn(params) -> NesterovState:
        return NesterovState(jnp.zeros((), jnp.int32), optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        theta = optax.tree.add(params, updates)

        def extrapolate(t, previous, p):
            e = state.count.astype(t.dtype) / (state.count + 3).astype(t.dtype)
            return (t + e * (t - previous)) - p

        return jax.tree_util.tree_map(extrapolate, theta, state.previous, params), NesterovState(state.count + 1, theta)

    return optax.GradientTransformation(init_fn, update_fn)


def igos_optimizer(config: IGOSConfig) -> optax.GradientTransformationExtraArgs:
    """The chain that turns a descent direction into a mask update (see the module docstring)."""
    if config.optimizer == "nag":
        return optax.chain(optax.scale(-jnp.asarray(config.alpha0)), scale_by_nesterov_extrapolation())
    return optax.chain(
        optax.scale(-1.0),
        scale_by_projected_backtracking(config.alpha0, config.armijo, config.decay, config.min_step),
    )


# -------------------------------------------------------------------------------- optimisation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IGOSTrace:
    """Per iteration: the objective at the iterate (the line search's base value, with its noise;
    NaN for NAG unless asked for), the step taken, and the line-search trials (0 for NAG, whose
    step is alpha0)."""

    loss: Float[Array, "*b t"]
    step_size: Float[Array, "*b t"]
    trials: Int[Array, "*b t"]


def optimise(problem: Problem, optimizer: optax.GradientTransformationExtraArgs, *, nag_loss: bool = False):
    """(final masks, IGOSTrace) of one image: `config.iterations` steps of direction, optax update
    and projection to [0, 1], as one `lax.scan`. The line search's base value is the trace's loss;
    NAG evaluates no objective, so its loss is NaN unless `nag_loss` (one evaluation per iteration)."""
    config = problem.config

    def step(carry, iteration):
        masks, state = carry
        direction = problem.direction(masks, iteration)
        value_fn = lambda params, evaluation: problem.objective(params, iteration, evaluation)  # noqa: E731
        updates, state = optimizer.update(direction, state, masks, grad=direction, value_fn=value_fn)
        masks_before, masks = masks, project_box(optax.apply_updates(masks, updates), 0.0, 1.0)
        nan = jnp.full((), jnp.nan, problem.image.dtype)
        loss = optax.tree.get(state, "value", value_fn(masks_before, jnp.int32(0)) if nag_loss else nan)
        step_size = optax.tree.get(state, "step_size", jnp.asarray(config.alpha0, jnp.float32))
        trials = optax.tree.get(state, "trials", jnp.zeros((), jnp.int32))
        return (masks, state), IGOSTrace(loss, step_size, trials)

    masks = problem.initial_masks()
    (masks, _), records = jax.lax.scan(step, (masks, optimizer.init(masks)), jnp.arange(config.iterations))
    return masks, records


# The name of the metric's mask among the extra outputs (`jaxattr explain` saves <image>.mask.npy).
MASK_OUTPUT = "mask"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IGOSResult:
    """Everything one I-GOS run produces, batch first."""

    mask: Float[Array, "b s s"]  # low = salient: I-GOS / iGOS+ M, iGOS++ Md * Mi; in [0, 1], unnormalised
    saliency: Float[Array, "b h w"]  # 1 - up(mask): high = salient (what the registered methods return)
    deletion_mask: Float[Array, "b s s"] | None  # iGOS++'s Md (None otherwise)
    insertion_mask: Float[Array, "b s s"] | None  # iGOS++'s Mi
    baselines: Float[Array, "b h w 3"]  # the baselines used, pixel space (the IGOS metric's substrate)
    targets: Int[Array, " b"]
    trace: IGOSTrace  # per-iteration loss, step size and line-search trials

    def extras(self) -> dict[str, Array]:
        """The low-resolution masks by name (what `jaxattr explain` saves beside the map)."""
        named = {MASK_OUTPUT: self.mask, "deletion_mask": self.deletion_mask, "insertion_mask": self.insertion_mask}
        return {name: value for name, value in named.items() if value is not None}


@functools.partial(jax.jit, static_argnames=("variant", "nag_loss", "noise"))
def _igos(forward, images, targets, key, config: IGOSConfig, baselines=None, *, variant: str, nag_loss: bool, noise: NoiseFn):
    rules = RULES[variant]
    baselines = igos_baselines(images, config.blur_kernel) if baselines is None else broadcast_baselines(baselines, images)
    optimizer = igos_optimizer(config)

    def one(image, baseline, target, image_key):
        problem = Problem(rules, forward.from_normalised, image, baseline, target, config, image_key, noise)
        return optimise(problem, optimizer, nag_loss=nag_loss)

    keys = image_keys(key, images.shape[0])
    masks, records = jax.vmap(one)(forward.normalise(images), forward.normalise(baselines), targets, keys)
    mask = rules.output(masks)
    pair = masks if rules.two_masks else MaskPair(None, None)
    saliency = 1 - upsample(mask, images.shape[1:3])
    return IGOSResult(mask, saliency, pair.deletion, pair.insertion, baselines, targets, records)


_CONFIGS: dict[str, type[IGOSConfig]] = {"igos": IGOSConfig, "igos_plus": IGOSPlusConfig, "igos_pp": IGOSPlusConfig}


def igos_masks(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    variant: Variant = "igos",
    config: IGOSConfig | None = None,
    key: jax.Array | None = None,
    baselines: Float[Array, "*f"] | None = None,
    trace: bool = False,
    noise: NoiseFn = gaussian_noise,
) -> IGOSResult:
    """Optimise I-GOS ('igos'), iGOS+ ('igos_plus') or iGOS++ ('igos_pp') masks for each image's
    target (default: its predicted class) and return everything (`IGOSResult`).

    model: a jaxattr Model (the method works in its normalised input space).
    config: `IGOSConfig` for 'igos', `IGOSPlusConfig` for the others (default: the reference's).
    key: required; one key for the batch (image i draws from fold_in(key, i)) or one per image.
    baselines: replaces the blurred baseline (`igos_baselines`): an array broadcastable to the
      images, in pixel space.
    trace: also evaluate NAG's objective at every iteration for the trace's loss (the line search
      computes it anyway; NAG does not: without `trace` its loss is NaN).
    noise: `noise(image_key, iteration, slot, shape, dtype) -> eps` replaces the Gaussian draws
      (`gaussian_noise`; `zero_noise` for noiseless tests); a static argument."""
    if variant not in RULES:
        raise ValueError(f"unknown I-GOS variant {variant!r}; expected one of {VARIANTS}")
    config_class = _CONFIGS[variant]
    config = config_class() if config is None else config
    if type(config) is not config_class:
        raise TypeError(f"{variant} takes an {config_class.__name__}, got {type(config).__name__}")
    model = require_model(model, variant, "works in the model's normalised input space")
    if key is None:
        raise ValueError(f"{variant} is stochastic (noise on every path image): pass key=jax.random.key(seed)")
    _check_images(images, config.mask_size)
    check_inputs(images, targets)
    # Targets resolved here, so None, an int and an array share one compiled program.
    targets = predicted_classes(model, images) if targets is None else targets
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), images.shape[:1])
    nag_loss = bool(trace) and config.optimizer == "nag"
    compiled = functools.partial(_igos, variant=variant, nag_loss=nag_loss, noise=noise)
    return run_compiled(compiled, config_class, model, images, targets, config=config, key=key, baselines=baselines)


def _check_images(images, mask_size: int) -> None:
    shape = np.shape(images)
    if len(shape) == 4 and mask_size > min(shape[1:3]):
        raise ValueError(f"mask_size {mask_size} is larger than the images ({shape[1]}x{shape[2]}); use at most {min(shape[1:3])}")
    if not isinstance(images, jax.core.Tracer) and not np.isfinite(np.asarray(images)).all():
        raise ValueError("images contain NaN or inf; I-GOS needs finite pixel values in [0, 1]")


def _with_masks(variant: Variant):
    """The registry's `extras` call of `variant`: (saliency, low-resolution masks by name)."""

    def explain_with_masks(model, images, targets=None, *, config, key=None, baselines=None):
        result = igos_masks(model, images, targets, variant=variant, config=config, key=key, baselines=baselines)
        return result.saliency, result.extras()

    return explain_with_masks


def igos(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    config: IGOSConfig = IGOSConfig(),
    key: jax.Array | None = None,
    baselines: Float[Array, "*f"] | None = None,
) -> Float[Array, "b h w"]:
    """I-GOS saliency maps 1 - up(M), high = salient (the mask M and the rest: `igos_masks`).

    One deletion mask, TV regulariser, integrated-gradient descent with the reference's line
    search. `key` is required (noise on every path image); `baselines` replaces the blurred one."""
    return igos_masks(model, images, targets, variant="igos", config=config, key=key, baselines=baselines).saliency


def igos_plus(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    config: IGOSPlusConfig = IGOSPlusConfig(),
    key: jax.Array | None = None,
    baselines: Float[Array, "*f"] | None = None,
) -> Float[Array, "b h w"]:
    """iGOS+ saliency maps 1 - up(M), high = salient: one mask optimised for deletion and insertion
    at once, bilateral TV regulariser. Arguments as `igos`."""
    return igos_masks(model, images, targets, variant="igos_plus", config=config, key=key, baselines=baselines).saliency


def igos_pp(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    config: IGOSPlusConfig = IGOSPlusConfig(),
    key: jax.Array | None = None,
    baselines: Float[Array, "*f"] | None = None,
) -> Float[Array, "b h w"]:
    """iGOS++ saliency maps 1 - up(Md Mi), high = salient: a deletion and an insertion mask,
    bilateral TV regulariser. Arguments as `igos`; both masks: `igos_masks(..., variant='igos_pp')`."""
    return igos_masks(model, images, targets, variant="igos_pp", config=config, key=key, baselines=baselines).saliency


# The maps are 1 - up(mask) in [0, 1] at image resolution; display: min-max, as the reference's heatmaps.
_DISPLAY = dict(saliency=maps.identity, contrast=Contrast("min", 100.0), needs_model=True, stochastic=True, takes_baselines=True)
register(MethodSpec("igos", igos, IGOSConfig, "I-GOS: a deletion mask optimised with integrated gradients (TV)",
                    extras=_with_masks("igos"), **_DISPLAY))
register(MethodSpec("igos_plus", igos_plus, IGOSPlusConfig, "iGOS+: one mask for deletion and insertion (bilateral TV)",
                    extras=_with_masks("igos_plus"), **_DISPLAY))
register(MethodSpec("igos_pp", igos_pp, IGOSPlusConfig, "iGOS++: deletion and insertion masks (bilateral TV)",
                    extras=_with_masks("igos_pp"), **_DISPLAY))
