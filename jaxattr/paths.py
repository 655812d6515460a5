"""The one path-integration engine behind every path method (IG, GNL-IG, Blur IG, IG2, ...).

    attribution = ( Σ_k w_k · ∇score(p(t_k)) ⊙ p'(t_k) ) / divisor

over the nodes t_k and weights w_k of a quadrature rule, for a path p from a baseline side to the
image with tangent p'. Three pieces, each small:

* quadrature rules (`quadrature`, `nodes_and_weights`): captum's rules with captum's names and
  node values, PAIR saliency's inclusive-mean rule ('pair') and the I-GOS right rule ('igos'),
  computed exactly as each anchor computes them (metrics.md §6);
* paths: anything with `points(t)` and `tangents(t)` (`Path`); `StraightLine` is IG's, other
  methods bring their own (Blur IG's blur path, IG2's polyline);
* `integrate`: gradients of the target score at the path points, one chunk of nodes at a time
  (`chunked_sum`), so memory follows the chunk size while the step count only adds time.

Baselines for straight paths: `baseline_images`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxattr.methods._common import Forward, Output, image_keys, input_gradients, target_scores

# ---------------------------------------------------------------------------------- quadrature

RULES: tuple[str, ...] = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "pair",
    "igos",
)


@dataclasses.dataclass(frozen=True)
class Quadrature:
    """A rule's nodes and weights as its anchor applies them (float64 arrays holding the exact values).

    The integral is (Σ_k weights_k · integrand_k) / divisor with the running total kept in
    `accumulator` dtype (None: the inputs' dtype). Only PAIR's rule needs the last two: it sums the
    raw gradients into a float32 buffer (even for float64 inputs) and divides by n at the end."""

    nodes: np.ndarray
    weights: np.ndarray
    divisor: float = 1.0
    accumulator: str | None = None

    @property
    def effective_weights(self) -> np.ndarray:
        return self.weights / self.divisor


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32 on the CPU, value for value, without torch.

    torch rounds start and end to float32, takes step = (end - start) / (steps - 1) in float32, and
    computes the first half of the points as start + step·i and the second half as
    end - step·(steps - 1 - i), each as one fused multiply-add in its AVX2/AVX-512 kernels (what
    torch runs on any x86-64 CPU of the last decade; its non-vectorised build rounds the product
    first and differs by an ulp at some nodes). `jnp.linspace` and NumPy differ too. The float64
    arithmetic below is exact (a float32 step times an index below 2**29, plus a float32 in
    [0, 1]), so rounding it once to float32 is the FMA."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    index = np.arange(steps)
    head = np.float64(start32) + step * index
    tail = np.float64(end32) - step * (steps - 1 - index)
    return np.where(index < steps // 2, head, tail).astype(np.float32)


def _captum_riemann(steps: int, start: float, end: float, *, trapezoid: bool = False) -> Quadrature:
    # captum: alphas from a float32 torch.linspace; step sizes 1/n (ends halved for its "trapezoid",
    # which sums to (n-1)/n), cast to float32 when they multiply the gradients.
    weights = np.full(steps, 1 / steps)
    if trapezoid:
        weights[[0, -1]] /= 2
    nodes = torch_linspace_float32(start, end, steps)
    return Quadrature(nodes.astype(np.float64), weights.astype(np.float32).astype(np.float64))


def _gauss_legendre(steps: int) -> Quadrature:
    # captum: NumPy's float64 Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1];
    # modern captum casts the weights to float32 (captum 0.2.0, GNL's pin, kept them float64).
    xi, w = np.polynomial.legendre.leggauss(steps)
    return Quadrature(0.5 * (1 + xi), (0.5 * w).astype(np.float32).astype(np.float64))


def _pair(steps: int) -> Quadrature:
    # saliency 0.2.1: float64 np.linspace(0, 1, n) with both ends, unweighted sum into float32, / n.
    return Quadrature(np.linspace(0, 1, steps), np.ones(steps), divisor=float(steps), accumulator="float32")


def _igos(steps: int) -> Quadrature:
    # I-GOS path score: float32 torch.linspace(1/N, 1, N) (t = 0 excluded), each node weighted 1/N.
    return Quadrature(torch_linspace_float32(1 / steps, 1, steps).astype(np.float64), np.full(steps, 1 / steps))


_RULE_BUILDERS: dict[str, tuple[int, Callable[[int], Quadrature]]] = {  # name -> (minimum steps, builder)
    "gausslegendre": (1, _gauss_legendre),
    "riemann_left": (2, lambda n: _captum_riemann(n, 0, 1 - 1 / n)),
    "riemann_right": (2, lambda n: _captum_riemann(n, 1 / n, 1)),
    "riemann_middle": (2, lambda n: _captum_riemann(n, 1 / (2 * n), 1 - 1 / (2 * n))),
    "riemann_trapezoid": (2, lambda n: _captum_riemann(n, 0, 1, trapezoid=True)),
    "pair": (2, _pair),
    "igos": (1, _igos),
}


def check_rule(rule: str, steps: int) -> None:
    if rule not in _RULE_BUILDERS:
        raise ValueError(f"unknown quadrature rule {rule!r}; expected one of {RULES}")
    minimum = _RULE_BUILDERS[rule][0]
    if not (isinstance(steps, (int, np.integer)) and steps >= minimum):
        raise ValueError(f"rule {rule!r} needs an integer number of steps >= {minimum}, got {steps!r}")


def quadrature(rule: str, steps: int) -> Quadrature:
    """The rule `rule` with `steps` nodes on [0, 1] (0 = baseline side, 1 = the image)."""
    check_rule(rule, steps)
    return _RULE_BUILDERS[rule][1](int(steps))


def nodes_and_weights(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, weights) of `rule`: the integral is Σ_k weights_k f(nodes_k). float64 arrays holding
    the anchor's values (captum's float32 node and weight values, PAIR's 1/n)."""
    q = quadrature(rule, steps)
    return q.nodes.copy(), q.effective_weights


# -------------------------------------------------------------------------------------- paths


class Path(Protocol):
    """A path through input space, parametrised by the quadrature's node variable t.

    `points(t)` and `tangents(t)` map nodes (k,) to (k, b, h, w, c). A path whose tangent is the
    same at every node sets `constant_tangent` and returns it without node axis, (b, h, w, c): the
    engine then multiplies the summed gradients by it once (captum's and PAIR's order, and one
    multiply instead of one per node)."""

    constant_tangent: ClassVar[bool]

    def points(self, nodes: Float[Array, " k"]) -> Float[Array, "k b h w c"]: ...

    def tangents(self, nodes: Float[Array, " k"] | None) -> Float[Array, "..."]: ...


@functools.partial(jax.tree_util.register_dataclass, data_fields=["baselines", "images"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StraightLine:
    """x' + t (x - x'), t in [0, 1]: Integrated Gradients' path, tangent x - x'."""

    baselines: Float[Array, "b h w c"]
    images: Float[Array, "b h w c"]

    constant_tangent: ClassVar[bool] = True

    def points(self, nodes: Float[Array, " k"]) -> Float[Array, "k b h w c"]:
        # baseline + t * (x - baseline) in the images' dtype: captum's expression, node rounded first.
        t = nodes.astype(self.images.dtype)[:, None, None, None, None]
        return self.baselines + t * (self.images - self.baselines)

    def tangents(self, nodes: Float[Array, " k"] | None = None) -> Float[Array, "b h w c"]:
        return self.images - self.baselines


# ----------------------------------------------------------------------------------- baselines

BASELINES: tuple[str, ...] = ("black", "mean", "blur", "uniform")


def check_baseline(kind: str) -> None:
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES} (or pass an array)")


def baseline_images(
    kind: str,
    forward: Forward,
    images: Float[Array, "b h w c"],
    *,
    key: jax.Array | None = None,
    blur_sigma: float = 50.0,
) -> Float[Array, "b h w c"]:
    """A baseline per image, in pixel space.

    'black' zeros; 'mean' the model's mean colour, i.e. zero in the model's normalised space (what
    captum and GNL use on normalised inputs; needs a jaxattr Model); 'blur' the image blurred with
    SciPy's zero-padded Gaussian at `blur_sigma` (Blur IG's fully blurred end); 'uniform' U(0, 1)
    noise drawn per image from `key` (an image draws the same noise in any batch)."""
    check_baseline(kind)
    if kind == "black":
        return jnp.zeros_like(images)
    if kind == "mean":
        mean = getattr(getattr(forward, "module", None), "mean", None)
        if mean is None:
            raise TypeError(
                f"baseline 'mean' reads the model's normalisation mean: pass a jaxattr Model, "
                f"got {type(forward).__name__}"
            )
        return jnp.broadcast_to(jnp.asarray(mean, images.dtype), images.shape)
    if kind == "blur":
        from jaxattr.blur import gaussian_blur

        return gaussian_blur(images, blur_sigma)
    if key is None:
        raise ValueError("baseline 'uniform' is random: pass key=jax.random.key(seed)")
    keys = image_keys(key, images.shape[0])
    return jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:], images.dtype))(keys)


def broadcast_baselines(baselines: Any, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """A user-supplied baseline array broadcast to the images: (b, h, w, c), (1, h, w, c), (h, w, c),
    a colour (c,) or a scalar."""
    baselines = jnp.asarray(baselines, images.dtype)
    try:
        return jnp.broadcast_to(baselines, images.shape)
    except ValueError:
        raise ValueError(
            f"baselines of shape {baselines.shape} do not broadcast to the images' shape {images.shape}"
        ) from None


# -------------------------------------------------------------------------------------- engine


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")


def chunked_sum(fn: Callable[[Any], Any], xs: Any, init: Any = None, *, chunk: int | None = None) -> Any:
    """Σ over chunks of fn(chunk of xs): `xs` is a pytree split along its leading axis into chunks of
    `chunk` (None: one chunk holding everything); each chunk's result is added into the running
    total, which starts at `init` and keeps its dtypes (None: zeros shaped like fn's result).

    An accumulating `lax.scan` over the full chunks, then the remainder as one smaller chunk (so
    no padding work). Unlike `lax.map(..., batch_size=)`, which stacks every chunk's output before
    anything can sum them, only the running total is live between chunks: memory follows the
    chunk, not the number of chunks. Per-chunk sums added in order are also PAIR's and captum's
    (`internal_batch_size`) order of summation. A single chunk is evaluated without a loop: XLA:CPU
    runs convolutions inside loop bodies several times slower (jax-ml/jax#12868)."""
    check_chunk(chunk)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    size = n if chunk is None else min(int(chunk), n)
    full, rest = divmod(n, size)

    def add(total, part):
        # Summed in the wider dtype, then rounded to the total's, as NumPy's `total += part` does.
        return jax.tree_util.tree_map(lambda t, p: (t + p).astype(t.dtype), total, part)

    def split(x):
        return x[: full * size].reshape(full, size, *x.shape[1:])

    if init is None:
        result = jax.eval_shape(fn, jax.tree_util.tree_map(lambda x: x[:size], xs))
        init = jax.tree_util.tree_map(lambda r: jnp.zeros(r.shape, r.dtype), result)

    if full == 1:
        total = add(init, fn(jax.tree_util.tree_map(lambda x: x[:size], xs)))
    else:
        total, _ = jax.lax.scan(lambda t, part: (add(t, fn(part)), None), init, jax.tree_util.tree_map(split, xs))
    if rest:
        total = add(total, fn(jax.tree_util.tree_map(lambda x: x[full * size :], xs)))
    return total


def integrate(
    forward: Forward,
    path: Path,
    targets: Int[Array, " b"],
    rule: Quadrature,
    *,
    output: Output = "logit",
    chunk: int | None = None,
) -> Float[Array, "b h w c"]:
    """Σ_k w_k ∇score(p(t_k)) ⊙ p'(t_k) (/ divisor) for every image of the batch.

    Each chunk evaluates `chunk` nodes for all b images as one batch of chunk·b images (the model
    treats images independently), so results do not depend on `chunk`, only memory does; None
    evaluates every node at once (captum's internal_batch_size=None). Weights multiply the
    gradients elementwise, never through a matmul that a TPU/GPU would run at reduced precision."""
    probe = jax.eval_shape(path.points, jnp.zeros((1,)))
    _, b, *image_shape = probe.shape
    dtype = probe.dtype

    def chunk_sum(part):
        nodes, weights = part
        points = path.points(nodes)
        k = nodes.shape[0]
        _, grads = input_gradients(forward, points.reshape(k * b, *image_shape), jnp.tile(targets, k), output)
        grads = grads.reshape(points.shape)
        if not path.constant_tangent:
            grads = path.tangents(nodes) * grads
        return jnp.sum(weights.astype(dtype)[:, None, None, None, None] * grads, axis=0)

    nodes = jnp.asarray(rule.nodes, dtype)
    weights = jnp.asarray(rule.weights, dtype)
    init = jnp.zeros((b, *image_shape), rule.accumulator or dtype)
    total = chunked_sum(chunk_sum, (nodes, weights), init, chunk=chunk)
    if path.constant_tangent:
        total = total * path.tangents(None)
    if rule.divisor != 1:
        total = _divide(total, rule.divisor)
    return total.astype(dtype)


def _divide(x: Array, divisor: float) -> Array:
    """x / divisor rounded as a true division. XLA rewrites division by a broadcast scalar into a
    multiplication by its reciprocal (1 ulp off); the barrier hides the broadcast from that rewrite,
    which keeps PAIR's rule bit-exact."""
    return x / jax.lax.optimization_barrier(jnp.full(x.shape, divisor, x.dtype))


def completeness_delta(
    forward: Forward,
    attributions: Float[Array, "b h w c"],
    images: Float[Array, "b h w c"],
    baselines: Float[Array, "b h w c"],
    targets: Int[Array, " b"],
    output: Output = "logit",
) -> Float[Array, " b"]:
    """Σ attributions - (score(x) - score(x')) per image: 0 for an exact integral along any path
    from x' to x (captum's convergence delta). Not meaningful for modified gradients (GNL)."""
    end = target_scores(forward, images, targets, output)
    start = target_scores(forward, broadcast_baselines(baselines, images), targets, output)
    return jnp.sum(attributions, axis=(1, 2, 3)) - (end - start)
