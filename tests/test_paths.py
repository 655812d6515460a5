"""The path-integration engine: quadrature nodes and weights against captum, torch and NumPy;
exactness, paths, any rank and chunking on analytic functions and a tiny CNN."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import paths
from jaxattr.methods import path_scores

torch = pytest.importorskip("torch")
approximation_methods = pytest.importorskip("captum.attr._utils.approximation_methods")

CAPTUM_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
# torch's AVX2/AVX-512 linspace kernels use fused multiply-adds, which jaxattr reproduces; its
# non-vectorised build (ATEN_CPU_CAPABILITY=default) rounds differently at some nodes.
fused_torch_linspace = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="torch runs its non-vectorised linspace here"
)


@fused_torch_linspace
@pytest.mark.parametrize("rule", CAPTUM_RULES)
def test_captum_rules_equal_captum_approximation_parameters(rule):
    step_sizes, alphas = approximation_methods.approximation_parameters(rule)
    for n in range(2, 101):
        nodes, weights = paths.nodes_and_weights(rule, n)
        np.testing.assert_array_equal(nodes, np.asarray(alphas(n)), err_msg=f"{rule} n={n}")
        # captum multiplies the gradients by torch.tensor(step_sizes).float()
        np.testing.assert_array_equal(weights, torch.tensor(step_sizes(n)).float().double().numpy(), err_msg=f"{rule} n={n}")


@fused_torch_linspace
@pytest.mark.parametrize("seed", range(3))
def test_torch_linspace_float32_equals_torch(seed):
    rng = np.random.RandomState(seed)
    for n in list(range(1, 40)) + [64, 100, 257, 1000]:
        start, end = sorted(rng.rand(2) * rng.choice([1, 3, 100]))
        ours = paths.torch_linspace_float32(start, end, n)
        np.testing.assert_array_equal(ours, torch.linspace(start, end, n).numpy(), err_msg=f"n={n} [{start}, {end}]")


def test_gausslegendre64_keeps_captum_020s_float64_weights():
    # captum 0.2.0 (GNL's pin): 0.5 * leggauss(n) weights as float64 NumPy scalars; the nodes are
    # the 'gausslegendre' ones, the weights differ from modern captum's float32 ones by ~1e-8.
    for n in (1, 2, 16, 50, 100):
        nodes, weights = paths.nodes_and_weights("gausslegendre64", n)
        xi, w = np.polynomial.legendre.leggauss(n)
        np.testing.assert_array_equal(nodes, 0.5 * (1 + xi))
        np.testing.assert_array_equal(weights, 0.5 * w)
        np.testing.assert_array_equal(nodes, paths.nodes_and_weights("gausslegendre", n)[0])
    exact, rounded = (paths.nodes_and_weights(rule, 50)[1] for rule in ("gausslegendre64", "gausslegendre"))
    assert 1e-9 < np.abs(exact - rounded).max() / exact.max() < 1e-7


def test_pair_rule_is_saliency_inclusive_mean():
    for n in (2, 25, 100):
        nodes, weights = paths.nodes_and_weights("pair", n)
        np.testing.assert_array_equal(nodes, np.linspace(0, 1, n))  # saliency 0.2.1's nodes
        np.testing.assert_allclose(weights, np.full(n, 1 / n), rtol=1e-15)


@fused_torch_linspace
def test_igos_rule_is_float32_right_rule():
    for n in (1, 15, 40):
        nodes, weights = paths.nodes_and_weights("igos", n)
        np.testing.assert_array_equal(nodes, torch.linspace(1 / n, 1, n).numpy().astype(np.float64))
        np.testing.assert_array_equal(weights, np.full(n, 1 / n))


def test_bad_rule_and_steps_are_explained():
    with pytest.raises(ValueError, match="expected one of .*gausslegendre.*riemann_left.*pair.*igos"):
        paths.quadrature("simpson", 10)
    with pytest.raises(ValueError, match="steps >= 2"):
        paths.quadrature("riemann_left", 1)


# ------------------------------------------------------------------------- engine, analytic cases


def _cubic_forward(x):
    """Two 'logits': a cubic and a quadratic polynomial of the pixels (per image)."""
    flat = x.reshape(x.shape[0], -1)
    w = jnp.linspace(-1.0, 1.0, flat.shape[1], dtype=x.dtype)
    return jnp.stack([jnp.sum(w * flat**3, axis=1) + jnp.sum(flat, axis=1) ** 2, jnp.sum(w * flat**2, axis=1)], axis=1)


CUBIC = jax.tree_util.Partial(_cubic_forward)


def _score(targets, output="logit"):
    return path_scores(CUBIC, targets, output)


def _exact_gauss_legendre(n):
    # float64 weights: captum's (and so jaxattr's 'gausslegendre') are rounded to float32.
    xi, w = np.polynomial.legendre.leggauss(n)
    return paths.Quadrature(0.5 * (1 + xi), 0.5 * w)


def _images(rng, b=2, size=4, dtype=np.float64):
    return rng.rand(b, size, size, 3).astype(dtype)


def test_gauss_legendre_is_exact_for_polynomial_scores(rng):
    # The integrand of a cubic score along a line is a quadratic in t: 2 GL nodes integrate it exactly.
    with jax.enable_x64(True):
        x, baselines = _images(rng), _images(rng)
        targets = jnp.array([0, 1])
        path = paths.StraightLine(jnp.asarray(baselines), jnp.asarray(x))
        attributions = paths.integrate(_score(targets), path, _exact_gauss_legendre(2))
        delta = paths.completeness_delta(_score(targets), attributions, baselines, x)
        scale = np.abs(np.asarray(CUBIC(x))).max()
        assert np.abs(np.asarray(delta)).max() < 1e-13 * scale
        # ... and per feature it equals the 40-node result (no interaction term is left out).
        reference = paths.integrate(_score(targets), path, _exact_gauss_legendre(40))
        np.testing.assert_allclose(attributions, reference, rtol=1e-12, atol=1e-14)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _QuadraticTimeLine:
    """The straight line traversed as x' + t^2 (x - x'): tangent 2t (x - x'), not constant."""

    baselines: jax.Array
    images: jax.Array

    constant_tangent: ClassVar[bool] = False

    def points(self, nodes):
        t = nodes.astype(self.images.dtype)[:, None, None, None, None]
        return self.baselines + t**2 * (self.images - self.baselines)

    def tangents(self, nodes):
        t = nodes.astype(self.images.dtype)[:, None, None, None, None]
        return 2 * t * (self.images - self.baselines)


def test_any_parametrisation_of_the_line_gives_integrated_gradients(rng):
    # Per-feature path integrals do not depend on how the path is parametrised; along t -> t^2 the
    # cubic score's integrand has degree 5 in t, which 3 Gauss-Legendre nodes integrate exactly.
    with jax.enable_x64(True):
        x, baselines = jnp.asarray(_images(rng)), jnp.asarray(_images(rng))
        targets = jnp.array([1, 0])
        curved = paths.integrate(_score(targets), _QuadraticTimeLine(baselines, x), _exact_gauss_legendre(3))
        straight = paths.integrate(_score(targets), paths.StraightLine(baselines, x), _exact_gauss_legendre(2))
        np.testing.assert_allclose(curved, straight, rtol=1e-12, atol=1e-14)


def test_probability_output_is_completed_in_probabilities(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(_images(rng, size=2))
        baselines = jnp.zeros_like(x)
        targets = jnp.array([0, 1])
        path = paths.StraightLine(baselines, x)
        score = _score(targets, "probability")
        attributions = paths.integrate(score, path, _exact_gauss_legendre(64))
        delta = paths.completeness_delta(score, attributions, baselines, x)
        assert np.abs(np.asarray(delta)).max() < 1e-9


# ------------------------------------------------------------------------------- any rank


def _polynomial_score(points):
    """A per-example score of points (k, b, ...) of any rank: Σ w·p³ + (Σ p)² over all but k, b."""
    flat = points.reshape(*points.shape[:2], -1)
    w = jnp.linspace(-1.0, 1.0, flat.shape[-1], dtype=points.dtype)
    return jnp.sum(w * flat**3, axis=-1) + jnp.sum(flat, axis=-1) ** 2


def _direct_ig(score, start, end, rule):
    """Σ_k w_k ∇score(start + t_k (end - start)) ⊙ (end - start), one node at a time."""
    total = jnp.zeros_like(end)
    for t, w in zip(rule.nodes, rule.weights):
        point = start + t * (end - start)
        grads = jax.grad(lambda p: jnp.sum(score(p[None])))(point)
        total = total + w * grads
    return total * (end - start)


@pytest.mark.parametrize(
    "shape", [(2, 5, 7), (2, 3, 5, 5), (3, 6, 6), (2, 4, 4, 3)], ids=["tokens", "attention", "masks", "pixels"]
)
@pytest.mark.parametrize("chunk", [None, 2])
def test_integrate_works_on_any_rank(shape, chunk, rng):
    with jax.enable_x64(True):
        start, end = jnp.asarray(rng.rand(*shape)), jnp.asarray(rng.rand(*shape))
        rule = paths.quadrature("riemann_trapezoid", 5)
        ours = paths.integrate(_polynomial_score, paths.StraightLine(start, end), rule, chunk=chunk)
        assert ours.shape == shape
        np.testing.assert_allclose(ours, _direct_ig(_polynomial_score, start, end, rule), rtol=1e-12, atol=1e-14)


def test_integrate_works_on_pytrees(rng):
    # Two representations of one batch (tokens and attention) integrated together: each leaf gets
    # its own share, and the shares add up to the score difference (completeness).
    with jax.enable_x64(True):
        start = {"tokens": jnp.asarray(rng.rand(2, 5, 4)), "attention": jnp.asarray(rng.rand(2, 3, 5, 5))}
        end = {"tokens": jnp.asarray(rng.rand(2, 5, 4)), "attention": jnp.asarray(rng.rand(2, 3, 5, 5))}

        def score(points):
            return _polynomial_score(points["tokens"]) * _polynomial_score(points["attention"])

        ours = paths.integrate(score, paths.StraightLine(start, end), _exact_gauss_legendre(12))
        assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(start)
        delta = paths.completeness_delta(score, ours, start, end)
        assert np.abs(np.asarray(delta)).max() < 1e-9 * np.abs(np.asarray(score(jax.tree_util.tree_map(lambda e: e[None], end)))).max()


# ---------------------------------------------------------------------------------- chunking


def _tiny_cnn():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (3, 3, 3, 16)) * 0.3, "d": jax.random.normal(k2, (16, 5))}

    def forward(params, x):
        h = jax.lax.conv_general_dilated(x, params["w"].astype(x.dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).mean(axis=(1, 2)) @ params["d"].astype(x.dtype)

    return jax.tree_util.Partial(forward, params)


def _ig(forward, x, targets, steps, chunk):
    path = paths.StraightLine(jnp.zeros_like(x), x)
    return paths.integrate(path_scores(forward, targets), path, paths.quadrature("gausslegendre", steps), chunk=chunk)


def test_chunk_size_changes_memory_not_results(rng):
    forward = _tiny_cnn()
    x = jnp.asarray(_images(rng, size=32, dtype=np.float32))
    targets = jnp.array([1, 4])
    steps = 32
    run = jax.jit(_ig, static_argnames=("steps", "chunk"))
    results = {chunk: np.asarray(run(forward, x, targets, steps=steps, chunk=chunk)) for chunk in (None, 1, 5, 8, 32, 100)}
    for chunk, result in results.items():
        # Equal up to the order of the float32 summation.
        np.testing.assert_allclose(result, results[None], rtol=2e-6, atol=2e-6 * np.abs(results[None]).max(), err_msg=f"chunk={chunk}")

    def temp_bytes(chunk):
        compiled = run.lower(forward, x, targets, steps=steps, chunk=chunk).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    all_at_once, chunked = temp_bytes(None), temp_bytes(2)
    activations = steps * x.size * 16 // 3 * 4  # one float32 feature map of 16 channels per node
    assert chunked < all_at_once / 8, (chunked, all_at_once)
    assert all_at_once > activations  # the unchunked program holds every node's activations


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        paths.chunked_sum(lambda x: x.sum(0), jnp.ones((4, 2)), jnp.zeros(2), chunk=0)


def test_chunked_sum_adds_chunks_in_the_total_dtype():
    with jax.enable_x64(True):
        xs = jnp.asarray(np.random.RandomState(0).rand(10, 3))
        total = paths.chunked_sum(lambda x: x.sum(0), xs, jnp.zeros(3, jnp.float32), chunk=3)
        assert total.dtype == jnp.float32
        expected = np.zeros(3, np.float32)
        for start in range(0, 10, 3):  # NumPy's `total += chunk.sum(0)` into a float32 buffer
            expected += np.asarray(xs[start : start + 3]).sum(0)
        np.testing.assert_array_equal(np.asarray(total), expected)
