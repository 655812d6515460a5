"""SmoothGrad / SmoothGrad² / VarGrad against captum's NoiseTunnel and PAIR's GetSmoothedMask with
the same noise injected into both sides, plus the noise semantics (keys, sigma, chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import ConfigError, explain, method
from jaxattr.methods.gradcam import gradcam
from jaxattr.methods.gradients import SmoothGradConfig, smoothgrad
from jaxattr.models import create_model

torch = pytest.importorskip("torch")
pytest.importorskip("captum")
pytest.importorskip("saliency")

from converters import crosscheck  # noqa: E402
from converters.references import gradients as refs  # noqa: E402
from converters.torch_models import torch_twin  # noqa: E402

TARGETS = np.array([3, 7])


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(2, 32, 32, 3)


@pytest.fixture(scope="module", params=["float32", "float64"])
def twin(request):
    torch_model, model = torch_twin("resnet18")
    return request.param, model, torch_model


def _check(method, twin, images, **options):
    dtype, model, torch_model = twin
    result = crosscheck.run(method, model, torch_model, images, TARGETS, dtype=dtype, **options)
    assert result.ok, result


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_saliency_vs_captum(twin, images, kind):
    # 5 samples in chunks of 2: captum's nt_samples_batch_size partitions, the last one smaller.
    config = SmoothGradConfig(kind=kind, samples=5, chunk=2)
    if twin[0] == "float64":
        _check("smoothgrad", twin, images, config=config)
        return
    # float32 on a kink-free model: on a ReLU / max-pool network some noisy sample puts a unit within
    # float32 rounding of its kink, where torch's and XLA's convolutions (which round differently,
    # and differently on different CPUs) take opposite sides; at 32 px a flipped unit in the last
    # stage moves the whole map (measured on an AMD EPYC: 1 of 5 samples, 37 % of entries beyond
    # 1e-5). float32 arithmetic and the noise bookkeeping are what this compares.
    forward, torch_model = _smooth_pair(images.shape[1])
    x = images.astype(np.float32)
    ours, theirs = refs.smoothgrad_vs_captum(forward, torch_model, x, TARGETS, config=config)
    # VarGrad is E[a^2] - E[a]^2: float32 rounding is relative to the terms that cancel.
    scale = config.replace(kind="smoothgrad_sq") if kind == "vargrad" else config
    reference_scale = np.abs(refs.smoothgrad_vs_captum(forward, torch_model, x, TARGETS, config=scale)[1]).max()
    assert np.abs(ours - theirs).max() <= 1e-5 * reference_scale


def _smooth_pair(size: int, classes: int = 10):
    """The same smooth classifier (linear, tanh, linear on NHWC-flattened pixels) in JAX and torch."""
    rng = np.random.RandomState(7)
    w1 = (rng.randn(size * size * 3, 16) / np.sqrt(size * size * 3)).astype(np.float32)
    w2 = rng.randn(16, classes).astype(np.float32)
    forward = jax.tree_util.Partial(
        lambda w, x: jnp.tanh(x.reshape(x.shape[0], -1) @ w[0]) @ w[1], (jnp.asarray(w1), jnp.asarray(w2))
    )

    class Smooth(torch.nn.Module):
        def forward(self, x):  # NCHW in, flattened in NHWC order as on the JAX side
            flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            return torch.tanh(flat @ torch.from_numpy(w1)) @ torch.from_numpy(w2)

    return forward, Smooth()


def test_noise_tunnel_integrated_gradients_vs_captum(images):
    torch_model, model = torch_twin("resnet18")
    base = method("integrated_gradients", steps=6, rule="riemann_right")
    config = SmoothGradConfig(base=base, kind="vargrad", samples=3, relative=False, stdev=0.1)
    _check("smoothgrad", ("float32", model, torch_model), images, config=config)


def test_saliency_vs_captum(twin, images):
    _check("saliency", twin, images)


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq"])
def test_get_smoothed_mask_vs_pair(twin, images, kind):
    dtype, model, torch_model = twin
    with crosscheck.precision(dtype) as np_dtype:
        t = torch_model.to(torch.float64 if dtype == "float64" else torch.float32)
        ours, theirs = refs.smoothgrad_vs_pair(
            model.astype(np_dtype), t, images.astype(np_dtype), TARGETS, config=SmoothGradConfig(kind=kind, samples=4)
        )
    # PAIR accumulates in a float32 buffer even for float64 inputs (ig2_and_pair.md §B.6: 8e-8).
    assert crosscheck.max_rel_diff(ours, theirs) <= (1e-5 if dtype == "float32" else 2e-7)


# ------------------------------------------------------------------------------- noise semantics


def _half_squared_norm(x):
    """One 'logit', 0.5 |x|^2 per image: its gradient at x + n is x + n, so VarGrad estimates sigma^2."""
    return 0.5 * jnp.sum(x * x, axis=(1, 2, 3))[:, None]


@pytest.mark.parametrize("relative", [True, False])
def test_noise_standard_deviation(relative):
    # Values in [0.3, 0.8], not [0, 1]: there max(x) - min(x) and max(x) differ by a factor ~1.6, so
    # the check tells PAIR's range-relative sigma from one relative to the maximum.
    x = 0.3 + 0.5 * np.random.RandomState(1).rand(2, 8, 8, 3).astype(np.float32)
    x[1] = 0.3 + 0.25 * (x[1] - 0.3)  # a smaller range: a smaller relative sigma
    config = SmoothGradConfig(kind="vargrad", samples=1000, stdev=0.2, relative=relative, chunk=250)
    variance = np.asarray(smoothgrad(_half_squared_norm, x, 0, config=config, key=jax.random.key(0)))
    sigma = 0.2 * np.ptp(x, axis=(1, 2, 3)) if relative else np.full(2, 0.2)
    # 192 features x 1000 samples: the mean of the variance estimates is within ~0.5 % of sigma^2.
    np.testing.assert_allclose(variance.mean(axis=(1, 2, 3)), sigma**2, rtol=0.02)


def test_same_key_same_map_any_chunk_any_batch():
    _, model = torch_twin("resnet18")
    x = np.random.RandomState(2).rand(3, 16, 16, 3).astype(np.float32)
    run = lambda images, seed, chunk=None: np.asarray(
        smoothgrad(model, images, 5, config=SmoothGradConfig(samples=6, chunk=chunk), key=jax.random.key(seed))
    )
    first = run(x, 0)
    np.testing.assert_array_equal(first, run(x, 0))
    assert crosscheck.max_rel_diff(run(x, 0, chunk=4), first) <= 1e-6  # summation order only
    assert crosscheck.max_rel_diff(run(x[:2], 0), first[:2]) <= 1e-6  # an image's noise ignores the batch
    assert crosscheck.max_rel_diff(run(x, 1), first) > 1e-2


def test_per_image_keys_make_each_map_independent_of_its_batch():
    model = create_model("resnet18", weights=None)
    images = np.random.RandomState(1).rand(3, 16, 16, 3).astype(np.float32)
    keys = jax.random.split(jax.random.key(5), 3)
    config = SmoothGradConfig(samples=3)
    together = np.asarray(smoothgrad(model, images, config=config, key=keys))
    for i in range(3):
        alone = np.asarray(smoothgrad(model, images[i : i + 1], config=config, key=keys[i : i + 1]))
        # Same noise; only the convolution's batch size (and so its rounding) differs.
        assert crosscheck.max_rel_diff(together[i], alone[0]) <= 1e-6
    with pytest.raises(ValueError, match="per-image keys cannot be combined with noise"):
        smoothgrad(model, images, config=config, key=keys, noise=np.zeros((3, 3, 16, 16, 3), np.float32))


def test_explicit_noise_is_added_as_is():
    x = np.random.RandomState(3).rand(2, 4, 4, 3).astype(np.float32)
    noise = np.random.RandomState(4).randn(3, *x.shape).astype(np.float32)
    config = SmoothGradConfig(kind="smoothgrad_sq", samples=3)
    ours = smoothgrad(_half_squared_norm, x, 0, config=config, noise=noise)
    np.testing.assert_allclose(ours, np.mean((x + noise) ** 2, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 2, 4, 4, 3\)"):
        smoothgrad(_half_squared_norm, x, 0, config=config, noise=noise[:2])


def test_explain_smoothgrad(images):
    _, model = torch_twin("resnet18")
    x = images.astype(np.float32)
    result = explain(model, x, "smoothgrad", samples=3, key=jax.random.key(0))
    assert result.attributions.shape == x.shape and result.maps.shape == (2, 32, 32)
    with pytest.raises(ValueError, match="stochastic: pass key"):
        explain(model, x, "smoothgrad")
    with pytest.raises(ValueError, match="random: pass key"):
        smoothgrad(model, x)


def test_any_registered_method_is_a_base(images):
    _, model = torch_twin("resnet18")
    x = images.astype(np.float32)
    noise = np.random.RandomState(5).randn(2, *x.shape).astype(np.float32) * 0.1
    config = SmoothGradConfig(base=method("gradcam"), samples=2)
    ours = np.asarray(smoothgrad(model, x, TARGETS, config=config, noise=noise))
    per_sample = [np.asarray(gradcam(model, x + n, TARGETS)) for n in noise]
    np.testing.assert_allclose(ours, np.mean(per_sample, axis=0), rtol=1e-5, atol=1e-6 * np.abs(ours).max())
    result = explain(model, x, "smoothgrad", base=method("gradcam"), samples=2, key=jax.random.key(0))
    assert result.maps.shape == (2, 32, 32)


def test_config_errors():
    with pytest.raises(ConfigError, match="base must be a method bound to its config"):
        SmoothGradConfig(base="gradient")
    with pytest.raises(ConfigError, match="base must be a method .* that wraps no other"):
        SmoothGradConfig(base=method("smoothgrad"))
    with pytest.raises(ValueError, match="expected one of .*smoothgrad_sq.*vargrad"):
        SmoothGradConfig(kind="smoothgrad_squared")
    with pytest.raises(ConfigError, match="saliency has no option steps"):
        method("saliency", steps=3)
    with pytest.raises(ConfigError, match="stdev must be a finite number >= 0, got -0.1"):
        SmoothGradConfig(stdev=-0.1)
    with pytest.raises(ConfigError, match="samples must be an integer in \\[1, 1000000\\], got 0"):
        SmoothGradConfig(samples=0)
    # A config with a base method is hashable (it is static inside the compiled program).
    config = SmoothGradConfig(base=method("integrated_gradients", output="probability"))
    assert hash(config) == hash(SmoothGradConfig(base=method("integrated_gradients", output="probability")))
    assert config.to_dict()["base"] == {"method": "integrated_gradients", "config": method("integrated_gradients", output="probability").config.to_dict()}
