"""The one path-integration engine behind every path method (IG, GNL-IG, Blur IG, IG2, IIA, ...).

    attribution = ( Σ_k w_k · ∇score(p(t_k)) ⊙ p'(t_k) ) / divisor

over the nodes t_k and weights w_k of a quadrature rule, for a path p with tangent p'. Three
pieces, each small:

* quadrature rules (`quadrature`, `nodes_and_weights`): captum's rules with captum's names and
  node values, captum 0.2.0's float64-weight Gauss-Legendre ('gausslegendre64'), PAIR saliency's
  inclusive-mean rule ('pair') and the I-GOS right rule ('igos'), computed exactly as each anchor
  computes them (metrics.md §6);
* paths: anything with `points(t)` and `tangents(t)` (`Path`); `StraightLine` is IG's,
  `Polyline` (segments through given vertices) IG2's, other methods bring their own (Blur IG's
  blur path);
* `integrate`: gradients of a score at the path points, one chunk of nodes at a time
  (`chunked_sum`), so memory follows the chunk size while the step count only adds time.

The engine knows nothing of images or models: points are arrays of any rank, or pytrees of them
(pixels (b, h, w, c), tokens (b, n, d), attention (b, heads, n, n), masks (b, s, s)), and the score
is any function of a batch of points. The methods layer supplies a model's score
(`jaxattr.methods.path_scores`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Literal, Protocol, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

# ---------------------------------------------------------------------------------- quadrature

# The rules by name: the type of every config field that names one (the CLI's choices).
Rule = Literal[
    "gausslegendre",
    "gausslegendre64",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "pair",
    "igos",
]
RULES: tuple[str, ...] = get_args(Rule)


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


def _gauss_legendre(steps: int, *, float32_weights: bool = True) -> Quadrature:
    # captum: NumPy's float64 Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1].
    # Modern captum casts the weights to float32 ('gausslegendre'); captum 0.2.0, GNL's pin, kept
    # them float64 ('gausslegendre64': its step sizes are NumPy float64 scalars, a float64 tensor
    # under torch's type promotion). The two differ by ~1e-8 relative, visible only in float64:
    # the weights are cast to the points' dtype, so in float32 both rules are the same.
    xi, w = np.polynomial.legendre.leggauss(steps)
    weights = 0.5 * w
    if float32_weights:
        weights = weights.astype(np.float32).astype(np.float64)
    return Quadrature(0.5 * (1 + xi), weights)


def _pair(steps: int) -> Quadrature:
    # saliency 0.2.1: float64 np.linspace(0, 1, n) with both ends, unweighted sum into float32, / n.
    return Quadrature(np.linspace(0, 1, steps), np.ones(steps), divisor=float(steps), accumulator="float32")


def _igos(steps: int) -> Quadrature:
    # I-GOS path score: float32 torch.linspace(1/N, 1, N) (t = 0 excluded), each node weighted 1/N.
    return Quadrature(torch_linspace_float32(1 / steps, 1, steps).astype(np.float64), np.full(steps, 1 / steps))


_RULE_BUILDERS: dict[str, tuple[int, Callable[[int], Quadrature]]] = {  # name -> (minimum steps, builder)
    "gausslegendre": (1, _gauss_legendre),
    "gausslegendre64": (1, functools.partial(_gauss_legendre, float32_weights=False)),
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


def quadrature_bytes(rule: str, steps: int) -> int:
    """Memory that building and holding `rule`'s tables takes: float64 nodes and weights, their
    device copies, and for Gauss-Legendre NumPy's n x n companion matrix and its eigen-solver's
    workspace (leggauss)."""
    tables = 48 * steps
    return tables + (24 * steps * steps if rule.startswith("gausslegendre") else 0)


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

Points = PyTree[Float[Array, "k ..."]]  # one batch of points per node: a leading node axis


class Path(Protocol):
    """A path through any space, parametrised by the quadrature's node variable t.

    `points(t)` maps nodes (k,) to points with a leading node axis, e.g. (k, b, h, w, c) for a
    batch of images, or a pytree of such arrays; `tangents(t)` to the derivatives, same shape. A path
    whose tangent is the same at every node sets `constant_tangent` and returns it without node
    axis: the engine then multiplies the summed gradients by it once (captum's and PAIR's order,
    and one multiply instead of one per node)."""

    constant_tangent: ClassVar[bool]

    def points(self, nodes: Float[Array, " k"]) -> Points: ...

    def tangents(self, nodes: Float[Array, " k"] | None) -> Points: ...


def _along_nodes(values: Float[Array, " k"], like: Array) -> Array:
    """(k,) values shaped to broadcast against an array with a leading node axis."""
    return values.astype(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["start", "end", "direction"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class StraightLine:
    """start + t (end - start), t in [0, 1]: Integrated Gradients' path, tangent end - start.
    Arrays of any shape (or pytrees of them, with the same structure).

    `direction`: end - start as the caller knows it more exactly than the rounded difference of
    the ends, e.g. a displacement mapped from another space (`jaxattr.methods.straight_image_path`);
    None: end - start. It is the tangent and forms the points, start + t · direction."""

    start: PyTree[Array]
    end: PyTree[Array]
    direction: PyTree[Array] | None = None

    constant_tangent: ClassVar[bool] = True

    def points(self, nodes: Float[Array, " k"]) -> Points:
        # start + t * (end - start) in the arrays' dtype: captum's expression, node rounded first.
        def line(start, direction):
            return start + _along_nodes(nodes, direction[None]) * direction

        return jax.tree_util.tree_map(line, self.start, self.tangents())

    def tangents(self, nodes: Float[Array, " k"] | None = None) -> PyTree[Array]:
        if self.direction is not None:
            return self.direction
        return jax.tree_util.tree_map(lambda start, end: end - start, self.start, self.end)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["vertices"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Polyline:
    """Straight segments through vertices[0] (baseline side), ..., vertices[n] (the image side):
    arrays with a leading vertex axis (any rank after it), or pytrees of them. IG2's GradPath read
    from its counterfactual end back to the explicand is one.

    The parameter is the vertex index: node t = j is vertex j exactly, and its tangent is the
    displacement of the segment ending there, vertices[j] - vertices[j-1]. Only those integer nodes
    are defined; `rule()` gives them: integrate(score, polyline, polyline.rule()) is

        Σ_j ∇score(vertices[j]) ⊙ (vertices[j] - vertices[j-1]),   j = 1..n,

    each segment weighted by its actual displacement and its gradient taken at the end nearer the
    image (the right Riemann sum on the vertices; IG2's Eq. 3)."""

    vertices: PyTree[Array]

    constant_tangent: ClassVar[bool] = False

    def rule(self) -> Quadrature:
        n = jax.tree_util.tree_leaves(self.vertices)[0].shape[0] - 1
        if n < 1:
            raise ValueError("a polyline needs at least two vertices")
        return Quadrature(np.arange(1, n + 1, dtype=np.float64), np.ones(n))

    def points(self, nodes: Float[Array, " k"]) -> Points:
        index = nodes.astype(jnp.int32)
        return jax.tree_util.tree_map(lambda v: v[index], self.vertices)

    def tangents(self, nodes: Float[Array, " k"] | None) -> Points:
        index = nodes.astype(jnp.int32)
        return jax.tree_util.tree_map(lambda v: v[index] - v[index - 1], self.vertices)


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
    (`internal_batch_size`) order of summation. A single chunk is evaluated without a loop. A loop
    costs no speed with jaxattr's models (their CPU convolutions keep the convolution library's
    layouts inside loop bodies, `jaxattr.nn.conv_with_flipped_backward`): on CPU, chunks of about
    32 images per model call ran 0-18% faster than 128 at once (`benchmarks/ig.py --chunks`)."""
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


def chunked_map(fn: Callable[[Any], Any], xs: Any, *, chunk: int | None = None) -> Any:
    """fn over `xs` a chunk at a time: `xs` (a pytree) is split along its leading axis into chunks
    of `chunk` (None: one chunk); fn maps a chunk to results with the same leading axis, which are
    joined in order. The counterpart of `chunked_sum` for results that are kept (e.g. a model's
    activations at every path point): a loop over the full chunks, the remainder as one smaller
    chunk, and no loop at all for a single chunk."""
    check_chunk(chunk)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    size = n if chunk is None else min(int(chunk), n)
    full, rest = divmod(n, size)
    take = lambda lo, hi: jax.tree_util.tree_map(lambda x: x[lo:hi], xs)
    if full == 1:
        head = fn(take(0, size))
    else:
        split = jax.tree_util.tree_map(lambda x: x[: full * size].reshape(full, size, *x.shape[1:]), xs)
        stacked = jax.lax.map(fn, split)
        head = jax.tree_util.tree_map(lambda y: y.reshape(full * size, *y.shape[2:]), stacked)
    if not rest:
        return head
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), head, fn(take(full * size, n)))


def integrate(
    score: Callable[[Points], Array],
    path: Path,
    rule: Quadrature,
    *,
    chunk: int | None = None,
) -> PyTree[Array]:
    """Σ_k w_k ∇score(p(t_k)) ⊙ p'(t_k) (/ divisor): one integral per point of the path's batch.

    `score(points)` maps points with a leading node axis to scores of any shape; the gradient of
    their sum is taken, so each score must depend on its own point only (a model treating images
    independently does). `chunk` nodes are evaluated per step of the loop, so results do not
    depend on it, only memory does; None evaluates every node at once (captum's
    internal_batch_size=None). Weights multiply the gradients elementwise, never through a matmul
    that a TPU/GPU would run at reduced precision. Returns the integrals in the points' dtypes."""
    probe = jax.eval_shape(path.points, jnp.zeros((1,)))
    dtype = jax.tree_util.tree_leaves(probe)[0].dtype

    def chunk_sum(part):
        nodes, weights = part
        points = path.points(nodes)
        scores, vjp = jax.vjp(score, points)
        (grads,) = vjp(jnp.ones_like(scores))
        if not path.constant_tangent:
            grads = jax.tree_util.tree_map(jnp.multiply, path.tangents(nodes), grads)
        return jax.tree_util.tree_map(lambda g: jnp.sum(_along_nodes(weights, g) * g, axis=0), grads)

    nodes = jnp.asarray(rule.nodes, dtype)
    weights = jnp.asarray(rule.weights, dtype)
    init = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape[1:], rule.accumulator or p.dtype), probe)
    total = chunked_sum(chunk_sum, (nodes, weights), init, chunk=chunk)
    if path.constant_tangent:
        total = jax.tree_util.tree_map(jnp.multiply, total, path.tangents(None))
    if rule.divisor != 1:
        total = jax.tree_util.tree_map(lambda t: true_divide(t, rule.divisor), total)
    return jax.tree_util.tree_map(lambda t, p: t.astype(p.dtype), total, probe)


def true_divide(x: Array, divisor: float) -> Array:
    """x / divisor rounded as a true division. XLA rewrites division by a broadcast scalar into a
    multiplication by its reciprocal (1 ulp off); the barrier hides the broadcast from that rewrite,
    which keeps PAIR's rule (and I-GOS's p / N terms) bit-exact."""
    return x / jax.lax.optimization_barrier(jnp.full(x.shape, divisor, x.dtype))


def completeness_delta(
    score: Callable[[Points], Array], attributions: PyTree[Array], start: PyTree[Array], end: PyTree[Array]
) -> Array:
    """Σ attributions - (score(end) - score(start)) per point: 0 for an exact integral along any
    path from `start` to `end` (captum's convergence delta). `score` as for `integrate`, with a
    leading node axis; sums run over every axis after the leading batch axis. Not meaningful for
    modified gradients (GNL)."""
    stacked = jax.tree_util.tree_map(lambda s, e: jnp.stack([s, e]), start, end)
    scores = score(stacked)
    total = sum(jnp.sum(a.reshape(a.shape[0], -1), axis=1) for a in jax.tree_util.tree_leaves(attributions))
    return total - (scores[1] - scores[0])
