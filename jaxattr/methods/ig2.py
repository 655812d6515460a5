"""IG2: Integrated Gradients on the iterative gradient path (Zhuo & Ge, TPAMI 2024).

**GradPath.** From the explicand x, K steps of fixed L2 length η, each along the normalised
gradient that shrinks the squared distance between the representation of the point and that of a
counterfactual reference (by default the features the final linear classifier reads: a CNN's
pooled features, a ViT's class token after the final norm); each step is clipped to the value
range. Its end is the counterfactual "GradCF".

**IG2** integrates the target score's gradient along that path (the paper's Eq. 3: each segment
weighted by its actual, clipped displacement, the gradient taken at its end nearer x) and averages
over the references:

    IG2(x) = Σ_r w_r Σ_{i<K} (p_i - p_{i+1}) ⊙ ∇y(p_i),    p_0 = x, p_K = GradCF_r,

which sums to about y(x) - Σ_r w_r y(GradCF_r) (`IG2Result.completeness_delta`). Read from its
GradCF end, the path is a `jaxattr.paths.Polyline` and the sum is that polyline's rule.

Units and gradient space (ig2_and_pair.md A.5): the path lives in raw units, `value_scale` x
pixels ([0, 255] for images in [0, 1]), so `step_size` and `clip_*` are the reference's numbers.
`gradient_space='normalized'` (default) takes both gradients w.r.t. the model's normalised input,
(pixels - mean) / std, as the authors' notebooks do: direction and map are the reference's, and
completeness holds only up to that per-channel rescaling. `'input'` takes them w.r.t. the raw
path; the map then sums to the change of the score.

Computation: the GradPaths of all explicands x references form one batch of paths (the paths are
independent: the model treats images independently) advanced by a `lax.scan`; the search runs
`chunk` steps at a time, and each chunk's segments are integrated at once by `jaxattr.paths`, so
memory follows the chunk, never the step count. No Python loop over images, references or steps.

Policy vs the reference (§1): a zero gradient (a reference with the explicand's representation,
e.g. the explicand itself) leaves the point where it is instead of producing NaN; references are
given explicitly or drawn with an explicit key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxattr import maps, paths
from jaxattr.config import Config, ConfigError, config, integer, number, optional, pass_count, static, traced
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, image_keys, is_key_batch, path_scores, require_model, resolve_targets
from jaxattr.methods.base import ExtraOutput, MethodSpec, register, run_compiled
from jaxattr.methods.baselines import Baseline, baseline_images
from jaxattr.models import Model
from jaxattr.resize import resize

Selection = Literal["all", "other_class", "relevant"]


@config
class IG2Config(Config):
    """The reference's defaults (`ig2.py` GetMask) and its ImageNet notebook's conventions."""

    steps: int = static(201, pass_count())  # K: GradPath steps (and integration segments)
    # L2 length of every step over the whole image, in raw units; tuned for 299x299x3 inputs in
    # [0, 255]: scale it with sqrt(number of features) for other sizes (A.4).
    step_size: float = traced(256.0, number(0, exclusive_minimum=True))
    clip_min: float = traced(0.0, number())  # path points are clipped to [clip_min, clip_max], raw units
    clip_max: float = traced(255.0, number())
    value_scale: float = traced(255.0, number(0, exclusive_minimum=True))  # raw units per pixel unit
    gradient_space: Literal["normalized", "input"] = static("normalized")
    # Representation layer; None: the input of the final linear classifier (`Model.classifier_input`;
    # a ViT's class token). Any other layer: its whole output.
    layer: str | None = static(None)
    output: Output = static("logit")  # the integrated score: the target's logit (the notebooks) or probability
    # GradPath steps searched and integrated per batch: memory (chunk x paths images per gradient
    # batch), never results. None: the whole path at once.
    chunk: int | None = static(1, optional(integer(1)))
    # Which of the given references an explicand uses: every one; those the model predicts as
    # another class than the explained one (the notebooks' rule); or those predicted as one of the
    # explicand's top `relevant_classes` classes other than the explained one (the notebooks'
    # "relevant references", top-2..top-k of the prediction).
    selection: Selection = static("other_class")
    relevant_classes: int = static(4, integer(2))
    # Up to this many qualifying references per explicand (the notebooks' n_reference = 8), drawn
    # with the key when more qualify; None: every qualifying one.
    num_references: int | None = static(8, optional(integer(1)))
    # The reference of explicands when no references are passed (generic callers: SmoothGrad's
    # base, evaluation sweeps): one of jaxattr's baselines, so the method always has one.
    reference: Baseline = static("black")

    def validate_fields(self) -> None:
        if not self.clip_min < self.clip_max:
            raise ConfigError("clip_max", f"clip_max must exceed clip_min, got [{self.clip_min}, {self.clip_max}]")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["counterfactuals", "references", "weights", "indices", "points"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class GradPath:
    """GradPaths of a batch of explicands, m reference slots each (pixels in [0, 1])."""

    counterfactuals: Float[Array, "b m h w 3"]  # GradCF: each path's end
    references: Float[Array, "b m h w 3"]  # the reference each path descends towards
    # The mean over references: 1/(number used) for the references used, 0 for empty slots (fewer
    # qualifying references than slots); an explicand without any has all zeros (and a zero map).
    weights: Float[Array, "b m"]
    indices: Int[Array, "b m"]  # each slot's index among the references given (0: the config's default reference)
    points: Float[Array, "b m k h w 3"] | None = None  # p_0 = x, ..., p_K = GradCF, with return_path


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["attributions", "path", "completeness_delta"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class IG2Result:
    attributions: Float[Array, "b h w 3"]
    path: GradPath  # without points
    # Σ attributions - Σ_r w_r (y(x) - y(GradCF_r)): the integration error in 'input' space (small
    # for small steps); in 'normalized' space the map is in other units and this is no check.
    completeness_delta: Float[Array, " b"]


# ----------------------------------------------------------------------------------- references


def _prepare_references(
    references: Any, images: Array, key: jax.Array | None, config: IG2Config
) -> tuple[Array | None, dict[str, Array], dict[str, Array]]:
    """Validated references and how they travel through `run_compiled`: (references,
    per-image arrays, whole arrays). Shared sets (r, h, w, 3) are repeated per image under per-image
    keys, where every image is computed alone."""
    if references is None:
        return None, {}, {}
    references = jnp.asarray(references)
    if references.ndim not in (4, 5) or references.shape[-1] != 3:
        raise ValueError(
            f"references must be one set (r, h, w, 3) or one per explicand (b, r, h, w, 3), got shape {references.shape}"
        )
    b = images.shape[0]
    if references.ndim == 5 and references.shape[0] != b:
        raise ValueError(f"references per explicand must have {b} rows, one per image, got shape {references.shape}")
    if references.shape[-4] == 0:
        raise ValueError("no references: pass at least one reference image (or none at all for the config's default)")
    if not jnp.issubdtype(references.dtype, jnp.floating):
        raise TypeError(f"references must be floating-point images in [0, 1], got dtype {references.dtype}")
    references = references.astype(images.dtype)
    if references.shape[-3:-1] != images.shape[1:3]:
        warnings.warn(
            f"references of size {references.shape[-3]}x{references.shape[-2]} resized to the images' "
            f"{images.shape[1]}x{images.shape[2]} (bilinear, antialiased)",
            stacklevel=3,
        )
        flat = references.reshape(-1, *references.shape[-3:])
        flat = resize(flat, images.shape[1:3], "bilinear", antialias=True)
        references = flat.reshape(*references.shape[:-3], *flat.shape[1:])
    slots = _slots(references.shape[-4], config)
    if slots < references.shape[-4] and key is None:
        raise ValueError(
            f"drawing num_references={slots} of {references.shape[-4]} references needs a key: pass "
            "key=jax.random.key(seed), or num_references=None to use every qualifying one"
        )
    if references.ndim == 4 and is_key_batch(key, b):
        references = jnp.broadcast_to(references, (b, *references.shape))
    if references.ndim == 5:
        return references, {"references": references}, {}
    return references, {}, {"references": references}


def _slots(available: int, config: IG2Config) -> int:
    return available if config.num_references is None else min(config.num_references, available)


def _select_references(forward, images, targets, references, key, config: IG2Config):
    """(references (b, m, h, w, 3), weights (b, m), indices (b, m)): the slots of each explicand."""
    b = images.shape[0]
    if references is None:  # the config's default reference, one per explicand
        defaults = baseline_images(config.reference, forward, images, key=key)
        return defaults[:, None], jnp.ones((b, 1), images.dtype), jnp.zeros((b, 1), jnp.int32)
    available = references.shape[-4]
    if config.selection == "all":
        qualifies = jnp.ones((b, available), bool)
    else:
        flat = references.reshape(-1, *references.shape[-3:])
        classes = jnp.argmax(forward(flat), axis=-1).reshape(references.shape[:-3])
        classes = jnp.broadcast_to(classes, (b, available))
        qualifies = classes != targets[:, None]
        if config.selection == "relevant":
            top = jax.lax.top_k(forward(images), config.relevant_classes)[1]
            qualifies &= jnp.any(classes[:, :, None] == top[:, None, :], axis=-1)
    slots = _slots(available, config)
    if slots == available:  # every reference has a slot: no draw
        indices = jnp.broadcast_to(jnp.arange(available), (b, available))
    else:  # a uniform draw without replacement among the qualifying ones, then the others
        draws = jax.vmap(lambda k: jax.random.uniform(k, (available,)))(image_keys(key, b))
        indices = jnp.argsort(jnp.where(qualifies, draws, draws + 1.0), axis=-1)[:, :slots]
    used = jnp.take_along_axis(qualifies, indices, axis=-1)
    weights = used / jnp.maximum(jnp.sum(used, axis=-1, keepdims=True), 1)
    if references.ndim == 4:
        chosen = references[indices]
    else:
        chosen = jax.vmap(lambda refs, i: refs[i])(references, indices)
    return chosen, weights.astype(images.dtype), indices.astype(jnp.int32)


# ------------------------------------------------------------------------------------- GradPath


def _gradient_scale(model: Model, value_scale: Array, space: str) -> Array:
    """Per-channel factor turning raw-unit gradients into those of the gradient space:
    d/d normalised input = d/d raw x value_scale x std ('normalized'), or 1 ('input')."""
    if space == "input":
        return jnp.ones((3,), value_scale.dtype)
    return value_scale * jnp.asarray(model.module.std, value_scale.dtype)


@dataclasses.dataclass(frozen=True)
class _Search:
    """The GradPath search of a flat batch of n independent paths (explicands x references), in raw
    units. Not a pytree: it lives inside one trace."""

    model: Model
    config: IG2Config
    numbers: dict[str, Array]  # the config's traced numbers (`_runtime_numbers`)
    start: Array  # X: the explicands in raw units, (n, h, w, 3)
    target_representations: Array  # the references' representations, (n, d), constants
    stays: Array  # (n,) paths that do not move: references identical to their explicand
    scale: Array  # (3,) gradient scale

    def raw_scores(self, targets):
        """The score of raw points for `paths.integrate`, differentiated w.r.t. raw units."""
        return path_scores(lambda raw: self.model(raw / self.numbers["value_scale"]), targets, self.config.output)

    def direction(self, points: Array) -> Array:
        """Unit-L2 step direction per path: the gradient of -mean_d (rep(p) - rep(reference))² in
        the gradient space, normalised; 0 where it vanishes (the point stays: never NaN)."""
        def closeness(raw):
            representations = self.model.representation(raw / self.numbers["value_scale"], self.config.layer)
            return -jnp.sum(jnp.mean((representations - self.target_representations) ** 2, axis=-1))

        gradient = jax.grad(closeness)(points) * self.scale
        norm = jnp.sqrt(jnp.sum(gradient**2, axis=(1, 2, 3), keepdims=True))
        moves = (norm > 0) & ~self.stays[:, None, None, None]
        return jnp.where(moves, gradient / jnp.where(moves, norm, 1), 0)

    def step(self, offset: Array) -> Array:
        """One step of the offset δ from X (the reference's order of operations: the point is
        X + δ, δ <- clip(X + (δ + η·unit)) - X)."""
        unit = self.direction(self.start + offset)
        step = offset + unit * self.numbers["step_size"]
        return jnp.clip(self.start + step, self.numbers["clip_min"], self.numbers["clip_max"]) - self.start

    def run(self, offset: Array, steps: int, *, keep: bool) -> tuple[Array, Array | None]:
        """`steps` steps from offset δ: (final δ, every δ after each step (steps, n, ...) if keep)."""
        def body(delta, _):
            delta = self.step(delta)
            return delta, (delta if keep else None)

        return jax.lax.scan(body, offset, None, length=steps)


def _runtime_numbers(config: IG2Config, dtype) -> dict[str, Array]:
    """The config's traced numbers as runtime scalars of `dtype`. Behind an optimisation barrier,
    so the arithmetic is the same whether they are compile-time constants (a caller's jit closing
    over the config) or arguments: XLA turns a division by a constant into a multiplication by its
    reciprocal (1 ulp off), and a GradPath amplifies such differences."""
    names = ("step_size", "clip_min", "clip_max", "value_scale")
    values = jax.lax.optimization_barrier(tuple(jnp.asarray(getattr(config, n), dtype) for n in names))
    return dict(zip(names, values))


def _search(model: Model, images, references, config: IG2Config) -> _Search:
    """The search of every (explicand, reference slot) path, flattened to n = b x m paths."""
    b, m = references.shape[:2]
    numbers = _runtime_numbers(config, images.dtype)
    flat_references = references.reshape(b * m, *references.shape[2:])
    explicands = jnp.repeat(images, m, axis=0)
    return _Search(
        model,
        config,
        numbers,
        start=explicands * numbers["value_scale"],
        target_representations=jax.lax.stop_gradient(model.representation(flat_references, config.layer)),
        stays=jnp.all(flat_references == explicands, axis=(1, 2, 3)),
        scale=_gradient_scale(model, numbers["value_scale"], config.gradient_space),
    )


def _per_slot(x: Array, b: int, m: int) -> Array:
    return x.reshape(b, m, *x.shape[1:])


def _pixels(images: Array, offsets: Array, value_scale: Array, b: int, m: int) -> Array:
    """Path points in pixel units, x + δ / value_scale, per explicand and slot (x exactly where δ = 0)."""
    offsets = _per_slot(offsets, b, m)
    return images.reshape(b, 1, *([1] * (offsets.ndim - 5)), *images.shape[1:]) + offsets / value_scale


def _gradpath_of(images, search: _Search, selected, offset, offsets) -> GradPath:
    """The GradPath from the final offsets (n, ...) and, if kept, every step's (K, n, ...)."""
    references, weights, indices = selected
    b, m = references.shape[:2]
    value_scale = search.numbers["value_scale"]
    points = None
    if offsets is not None:  # (b, m, K+1, ...): p_0 = x, then x + δ_i
        offsets = jnp.concatenate([jnp.zeros_like(offsets[:1]), offsets])
        points = _pixels(images, jnp.moveaxis(offsets, 0, 1), value_scale, b, m)
    return GradPath(_pixels(images, offset, value_scale, b, m), references, weights, indices, points)


@functools.partial(jax.jit, static_argnames="return_path")
def _gradpath(model, images, targets, key, config: IG2Config, references=None, *, return_path: bool = False):
    targets = resolve_targets(model, images, targets)
    selected = _select_references(model, images, targets, references, key, config)
    search = _search(model, images, selected[0], config)
    offset, offsets = search.run(jnp.zeros_like(search.start), config.steps, keep=return_path)
    return _gradpath_of(images, search, selected, offset, offsets)


@functools.partial(jax.jit, static_argnames="return_path")
def _ig2(model, images, targets, key, config: IG2Config, references=None, *, return_path: bool = False) -> IG2Result:
    targets = resolve_targets(model, images, targets)
    selected = _select_references(model, images, targets, references, key, config)
    search = _search(model, images, selected[0], config)
    references, weights, _ = selected
    b, m = references.shape[:2]
    score = search.raw_scores(jnp.repeat(targets, m))

    def advance(state, steps):
        """`steps` more search steps, and the integral over their segments."""
        offset, total = state
        new_offset, offsets = search.run(offset, steps, keep=True)
        # The chunk's vertices from its GradCF side back to its start: the path read towards x.
        vertices = search.start + jnp.concatenate([offsets[::-1], offset[None]])
        polyline = paths.Polyline(vertices)
        total = total + paths.integrate(score, polyline, polyline.rule())
        return (new_offset, total), (offsets if return_path else None)

    chunk = config.steps if config.chunk is None else min(config.chunk, config.steps)
    full, rest = divmod(config.steps, chunk)
    state = (jnp.zeros_like(search.start), jnp.zeros_like(search.start))
    if full == 1:
        state, kept = advance(state, chunk)
    else:
        state, kept = jax.lax.scan(lambda s, _: advance(s, chunk), state, None, length=full)
        kept = None if kept is None else kept.reshape(-1, *kept.shape[2:])
    if rest:
        state, last = advance(state, rest)
        kept = None if kept is None else jnp.concatenate([kept, last])
    offset, integrals = state

    per_path = _per_slot(integrals * search.scale, b, m)
    attributions = jnp.sum(weights[:, :, None, None, None] * per_path, axis=1)
    ends = jnp.stack([search.start, search.start + offset])  # (2, n, ...): x and GradCF
    scores = _per_slot(score(ends).T, b, m)  # (b, m, 2)
    change = jnp.sum(weights * (scores[..., 0] - scores[..., 1]), axis=-1)
    delta = jnp.sum(attributions.reshape(b, -1), axis=-1) - change
    return IG2Result(attributions, _gradpath_of(images, search, selected, offset, kept), delta)


@jax.jit
def _selected(model, images, targets, key, config: IG2Config, references=None):
    targets = resolve_targets(model, images, targets)
    return _select_references(model, images, targets, references, key, config)


# ---------------------------------------------------------------------------------- public API


def _boundary(name: str, model, images, references, config: IG2Config, key):
    """Checks every entry point shares; returns the arrays for `run_compiled`."""
    model = require_model(model, name, "reads the model's representation layer")
    if not isinstance(config, IG2Config):
        raise TypeError(f"config must be an IG2Config, got {type(config).__name__}")
    model.representation_layer(config.layer)  # an unknown or missing layer fails here, not in the trace
    _check_clip(images, config)
    _, per_image, whole = _prepare_references(references, images, key, config)
    return model, per_image, whole


def _check_clip(images: Array, config: IG2Config) -> None:
    """The clip range must contain the explicands, or the first step would jump into it (checked
    where the values are known, i.e. outside a trace)."""
    try:
        low, high, scale = (float(v) for v in (config.clip_min, config.clip_max, config.value_scale))
        lowest, highest = float(jnp.min(images)) * scale, float(jnp.max(images)) * scale
    except (jax.errors.ConcretizationTypeError, TypeError):
        return
    if lowest < low or highest > high or not (math.isfinite(lowest) and math.isfinite(highest)):
        raise ValueError(
            f"the images span [{lowest:g}, {highest:g}] in raw units (value_scale {scale:g} x pixels), outside "
            f"the clip range [{low:g}, {high:g}]: widen clip_min/clip_max or set value_scale to the images' range"
        )


def gradpath(
    model: Model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    references: Float[Array, "r h w 3"] | Float[Array, "b r h w 3"] | None = None,
    config: IG2Config = IG2Config(),
    key: jax.Array | None = None,
    return_path: bool = False,
) -> GradPath:
    """The GradPath search alone: each explicand's counterfactuals (GradCF), one per reference slot,
    and with `return_path` every point of every path, pixels in [0, 1].

    `references`: one set for all explicands (r, h, w, 3) or one per explicand (b, r, h, w, 3),
    pixels in [0, 1] (another size is resized, with a warning); each explicand uses those that
    `config.selection` admits, up to `config.num_references` (drawn with `key` when more qualify).
    None: the config's default `reference`. `targets` (default: the predictions) are the explained
    classes the selection rules compare with."""
    model, per_image, whole = _boundary("gradpath", model, images, references, config, key)
    compiled = functools.partial(_gradpath, return_path=return_path)
    return run_compiled(compiled, IG2Config, model, images, targets, config=config, key=key, per_image=per_image, **whole)


def ig2_result(
    model: Model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    references: Float[Array, "r h w 3"] | Float[Array, "b r h w 3"] | None = None,
    config: IG2Config = IG2Config(),
    key: jax.Array | None = None,
    return_path: bool = False,
) -> IG2Result:
    """IG2 with its GradPaths (counterfactuals, the references used and their weights; every point
    with `return_path`, which keeps the whole path in memory) and the completeness delta. See `ig2`."""
    model, per_image, whole = _boundary("ig2", model, images, references, config, key)
    compiled = functools.partial(_ig2, return_path=return_path)
    return run_compiled(compiled, IG2Config, model, images, targets, config=config, key=key, per_image=per_image, **whole)


def select_references(
    model: Model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    references: Float[Array, "r h w 3"] | Float[Array, "b r h w 3"] | None = None,
    config: IG2Config = IG2Config(),
    key: jax.Array | None = None,
) -> tuple[Float[Array, "b m h w 3"], Float[Array, "b m"], Int[Array, "b m"]]:
    """The references each explicand's GradPaths descend towards, as `gradpath` picks them:
    (references, weights, indices among those given), without searching."""
    model, per_image, whole = _boundary("select_references", model, images, references, config, key)
    return run_compiled(_selected, IG2Config, model, images, targets, config=config, key=key, per_image=per_image, **whole)


def ig2(
    model: Model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    references: Float[Array, "r h w 3"] | Float[Array, "b r h w 3"] | None = None,
    config: IG2Config = IG2Config(),
    key: jax.Array | None = None,
) -> Float[Array, "b h w 3"]:
    """IG2 attributions of each image's target (default: its predicted class): the gradient of the
    target score integrated along the GradPath towards each reference, averaged over them.

    `references` as for `gradpath`: one set (r, h, w, 3) or one per explicand (b, r, h, w, 3); by
    default each explicand uses up to 8 of those the model predicts as another class (drawn with
    `key` when more qualify). None: the config's default reference (black), so generic callers
    (SmoothGrad, evaluation sweeps) can run it. Needs a jaxattr Model (it reads the representation
    layer)."""
    return ig2_result(model, images, targets, references=references, config=config, key=key).attributions


def _with_counterfactuals(model, images, targets=None, *, config: IG2Config = IG2Config(), key=None, references=None):
    """The registry's `extras` call: (attributions, {'gradcf': each path's end, 'gradcf_reference':
    the index of its reference among those given, -1 for an empty slot}) from one run."""
    result = ig2_result(model, images, targets, references=references, config=config, key=key)
    path = result.path
    used = jnp.where(path.weights > 0, path.indices, -1)
    return result.attributions, {"gradcf": path.counterfactuals, "gradcf_reference": used}


def _gradcf_pictures(extras: dict[str, Any]) -> dict[str, Any]:
    """One explicand's counterfactuals as 'gradcf<j>' pictures, j the reference's index among those given."""
    return {f"gradcf{j}": cf for cf, j in zip(extras["gradcf"], extras["gradcf_reference"]) if j >= 0}


register(
    MethodSpec(
        "ig2",
        ig2,
        IG2Config,
        "Integrated Gradients along the GradPath towards counterfactual references (IG2)",
        saliency=maps.abs_sum,  # the notebooks show VisualizeImageGrayscale: Σ_c |a|, 99th percentile
        contrast=Contrast("min", 99.0),
        needs_model=True,
        takes_references=True,
        extras=_with_counterfactuals,
        extra_outputs=(
            ExtraOutput(
                "save-path",
                "also write each image's counterfactual (GradCF: the GradPath's end) towards each reference "
                "it used, as <name>_gradcf<j>.png, j the reference's index among --references",
                ("gradcf", "gradcf_reference"),
                _gradcf_pictures,
            ),
        ),
    )
)
