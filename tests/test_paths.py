"""The path-integration engine: quadrature nodes and weights against captum, torch and NumPy;
exactness, paths, baselines and chunking on analytic functions and a tiny CNN."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxattr import paths
from jaxattr.models import create_model

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
    with pytest.raises(ValueError, match="expected one of .*black.*mean.*blur.*uniform"):
        paths.check_baseline("white")


# ------------------------------------------------------------------------- engine, analytic cases


def _cubic_forward(x):
    """Two 'logits': a cubic and a quadratic polynomial of the pixels (per image)."""
    flat = x.reshape(x.shape[0], -1)
    w = jnp.linspace(-1.0, 1.0, flat.shape[1], dtype=x.dtype)
    return jnp.stack([jnp.sum(w * flat**3, axis=1) + jnp.sum(flat, axis=1) ** 2, jnp.sum(w * flat**2, axis=1)], axis=1)


CUBIC = jax.tree_util.Partial(_cubic_forward)


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
        attributions = paths.integrate(CUBIC, path, targets, _exact_gauss_legendre(2))
        delta = paths.completeness_delta(CUBIC, attributions, x, baselines, targets)
        scale = np.abs(np.asarray(CUBIC(x))).max()
        assert np.abs(np.asarray(delta)).max() < 1e-13 * scale
        # ... and per feature it equals the 40-node result (no interaction term is left out).
        reference = paths.integrate(CUBIC, path, targets, _exact_gauss_legendre(40))
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
        curved = paths.integrate(CUBIC, _QuadraticTimeLine(baselines, x), targets, _exact_gauss_legendre(3))
        straight = paths.integrate(CUBIC, paths.StraightLine(baselines, x), targets, _exact_gauss_legendre(2))
        np.testing.assert_allclose(curved, straight, rtol=1e-12, atol=1e-14)


def test_probability_output_is_completed_in_probabilities(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(_images(rng, size=2))
        baselines = jnp.zeros_like(x)
        targets = jnp.array([0, 1])
        path = paths.StraightLine(baselines, x)
        attributions = paths.integrate(CUBIC, path, targets, _exact_gauss_legendre(64), output="probability")
        delta = paths.completeness_delta(CUBIC, attributions, x, baselines, targets, output="probability")
        assert np.abs(np.asarray(delta)).max() < 1e-9


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
    return paths.integrate(forward, path, targets, paths.quadrature("gausslegendre", steps), chunk=chunk)


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


# --------------------------------------------------------------------------------- baselines


def test_baselines(rng):
    model = create_model("resnet18", weights=None, image_size=16)
    x = jnp.asarray(_images(rng, b=3, size=16, dtype=np.float32))
    np.testing.assert_array_equal(paths.baseline_images("black", model, x), np.zeros(x.shape))
    mean = paths.baseline_images("mean", model, x)
    np.testing.assert_array_equal(mean, np.broadcast_to(np.float32(model.module.mean), x.shape))
    blurred = np.stack([scipy.ndimage.gaussian_filter(image, (2.0, 2.0, 0), mode="constant") for image in np.asarray(x)])
    np.testing.assert_allclose(paths.baseline_images("blur", model, x, blur_sigma=2.0), blurred, atol=1e-6)


def test_uniform_baseline_is_keyed_per_image(rng):
    x = jnp.asarray(_images(rng, b=3, size=8, dtype=np.float32))
    draw = lambda images, seed: np.asarray(paths.baseline_images("uniform", None, images, key=jax.random.key(seed)))
    first = draw(x, 0)
    assert first.min() >= 0 and first.max() < 1 and first.shape == x.shape
    np.testing.assert_array_equal(first, draw(x, 0))
    np.testing.assert_array_equal(first[:2], draw(x[:2], 0))  # the batch does not change an image's draw
    assert not np.array_equal(first, draw(x, 1))
    with pytest.raises(ValueError, match="key"):
        paths.baseline_images("uniform", None, x)


def test_mean_baseline_needs_a_model(rng):
    with pytest.raises(TypeError, match="jaxattr Model"):
        paths.baseline_images("mean", CUBIC, jnp.asarray(_images(rng, dtype=np.float32)))


def test_user_baselines_broadcast_or_explain(rng):
    x = jnp.asarray(_images(rng, b=2, size=4, dtype=np.float32))
    assert paths.broadcast_baselines(np.full(3, 0.5), x).shape == x.shape
    assert paths.broadcast_baselines(x[0], x).shape == x.shape
    with pytest.raises(ValueError, match=r"do not broadcast to the images' shape \(2, 4, 4, 3\)"):
        paths.broadcast_baselines(np.zeros((3, 4, 4, 3)), x)
