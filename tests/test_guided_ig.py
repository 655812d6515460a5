"""Guided IG: PAIR saliency's analytic checks; parity with saliency.core.GuidedIG on a torchvision twin."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.crosscheck import precision, references, run
from converters.torch_models import torch_twin
from jaxattr import GuidedIGConfig, explain, guided_ig, method_spec
from jaxattr.methods.guided_ig import guided_ig_path_attributions

NOTEBOOK = GuidedIGConfig(steps=25, fraction=0.5, max_dist=1.0)  # PAIR's example notebooks


def analytic(f, x, baseline=(0.0, 0.0), **settings) -> np.ndarray:
    """Guided IG of a scalar function of a 2-vector, in float64 like the reference."""
    with jax.enable_x64(True):
        gradients = jax.vmap(jax.grad(f))
        inputs, baselines = jnp.asarray([x], jnp.float64), jnp.asarray([baseline], jnp.float64)
        config = GuidedIGConfig(**settings)
        return np.asarray(guided_ig_path_attributions(gradients, inputs, baselines, config))[0]


def linear(v):
    return 2 * v[0] + v[1]


def independent_quadratic(v):
    return 2 * v[0] ** 2 + v[1] ** 2


def dependent_quadratic(v):
    return (2 * v[0] + v[1]) ** 2


# saliency's guided_ig_test.py cases (ig2_and_pair.md §3).
def test_linear_function_gives_integrated_gradients():
    settings = dict(steps=10, fraction=0.1, max_dist=0.5)
    np.testing.assert_allclose(analytic(linear, (10.0, 5.0), (-1.0, -3.0), **settings), [22.0, 8.0])
    np.testing.assert_allclose(analytic(linear, (10.0, 5.0), **settings), [20.0, 5.0])


def test_independent_quadratic():
    settings = dict(steps=1000, fraction=0.1, max_dist=0.4)
    above = analytic(independent_quadratic, (3.0, 3.0), **settings)
    np.testing.assert_allclose(above, [18.0, 9.0], rtol=0.01)
    below = analytic(independent_quadratic, (0.0, 0.0), (3.0, 3.0), **settings)
    np.testing.assert_allclose(below, [-18.0, -9.0], rtol=0.01)


def test_dependent_quadratic_reduces_to_ig_without_deviation_or_selection():
    for settings in (dict(fraction=0.1, max_dist=0.0), dict(fraction=1.0, max_dist=0.5)):
        mask = analytic(dependent_quadratic, (3.0, 3.0), steps=1000, **settings)
        np.testing.assert_allclose(mask, [54.0, 27.0], rtol=0.01)


def test_dependent_quadratic_unbounded_and_bounded():
    unbounded = analytic(dependent_quadratic, (3.0, 3.0), steps=1000, fraction=0.1, max_dist=1.0)
    np.testing.assert_allclose(unbounded, [72.0, 9.0], rtol=0.01)
    bounded = analytic(dependent_quadratic, (3.0, 3.0), steps=1000, fraction=0.1, max_dist=0.2)
    assert abs(bounded.sum() - 81.0) <= 0.1
    assert 55.0 < bounded[0] < 71.0 and 10.0 < bounded[1] < 26.0


def test_each_input_of_a_batch_follows_its_own_path():
    config = GuidedIGConfig(steps=200, fraction=0.1, max_dist=0.2)
    with jax.enable_x64(True):
        gradients = jax.vmap(jax.grad(dependent_quadratic))
        inputs = jnp.asarray([[3.0, 3.0], [0.0, 0.0], [1.0, -2.0]])
        baselines = jnp.asarray([[0.0, 0.0], [3.0, 3.0], [1.0, 0.5]])
        batched = np.asarray(guided_ig_path_attributions(gradients, inputs, baselines, config))
        for i in range(3):
            alone = guided_ig_path_attributions(gradients, inputs[i : i + 1], baselines[i : i + 1], config)
            np.testing.assert_array_equal(batched[i], np.asarray(alone)[0])


def test_input_equal_to_baseline_gives_zeros():
    np.testing.assert_array_equal(analytic(dependent_quadratic, (1.0, 2.0), (1.0, 2.0), steps=5), [0.0, 0.0])


# ---------------------------------------------------------------------------- the public method


def pixel_linear(images):
    """Logits of a linear model on NHWC pixels (any callable images -> logits is a forward)."""
    weights = jnp.linspace(-1.0, 2.0, images[0].size, dtype=images.dtype).reshape(images.shape[1:])
    score = jnp.sum(images * weights, axis=(1, 2, 3))
    return jnp.stack([score, -score], axis=-1)


def test_method_on_a_plain_callable_is_integrated_gradients_for_a_linear_model(rng):
    images = rng.rand(2, 4, 5, 3).astype(np.float32)
    attributions = np.asarray(guided_ig(pixel_linear, images, 0, config=GuidedIGConfig(steps=20)))
    weights = np.linspace(-1.0, 2.0, 60, dtype=np.float32).reshape(4, 5, 3)
    np.testing.assert_allclose(attributions, images * weights, rtol=1e-5, atol=1e-6)


def test_baseline_options(rng):
    images = rng.rand(1, 4, 4, 3).astype(np.float32)
    config = GuidedIGConfig(steps=10)
    black = np.asarray(guided_ig(pixel_linear, images, 0, config=config))
    zeros = np.asarray(guided_ig(pixel_linear, images, 0, config=config, baselines=0.0))
    np.testing.assert_array_equal(black, zeros)
    grey = np.asarray(guided_ig(pixel_linear, images, 0, config=config, baselines=0.5))
    weights = np.linspace(-1.0, 2.0, 48, dtype=np.float32).reshape(4, 4, 3)
    np.testing.assert_allclose(grey, (images - 0.5) * weights, rtol=1e-5, atol=1e-6)


def test_registered_and_explainable(rng):
    assert method_spec("guided_ig").config is GuidedIGConfig
    explanation = explain(pixel_linear, rng.rand(1, 4, 4, 3).astype(np.float32), "guided_ig", steps=5)
    assert explanation.maps.shape == (1, 4, 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "steps must be an integer in \\[1, 1000000\\]"),
        (dict(steps=2.5), "steps must be an integer in \\[1, 1000000\\]"),
        (dict(fraction=1.5), r"fraction must be a finite number in \[0, 1\]"),
        (dict(max_dist=-0.1), r"max_dist must be a finite number in \[0, 1\]"),
        (dict(baseline="grey"), "unknown baseline"),
        (dict(output="softmax"), "unknown output"),
    ],
)
def test_bad_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(GuidedIGConfig(), **overrides)


# ------------------------------------------------------------------ parity with PAIR's GuidedIG


@pytest.fixture(scope="module")
def resnet18():
    torch_model, model = torch_twin("resnet18")
    return model, torch_model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # float64 torch convolutions with 2 threads on a shared 2-core machine run ~7x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", [NOTEBOOK, GuidedIGConfig()], ids=["25-0.5-1.0", "defaults"])
def test_matches_pair_guided_ig_in_float64(resnet18, rng, config):
    # From random baselines: a black start ties every max-pool window exactly, and which entry wins
    # then depends on the CPU's convolution rounding (see converters.references.pair.guided_ig_vs_pair).
    model, torch_model = resnet18
    images, baselines = rng.rand(2, 16, 16, 3), rng.rand(2, 16, 16, 3)
    result = run("guided_ig", model, torch_model, images, config=config, baselines=baselines)
    assert result.dtype == "float64"
    assert result.ok, result


def test_float32_agrees_at_the_notebook_settings(resnet18, rng):
    # The reference always runs in float64; at 25/0.5/1.0 the float32 path does not branch differently.
    model, torch_model = resnet18
    images = rng.rand(1, 16, 16, 3).astype(np.float32)
    with precision("float32"):
        runner = references()["guided_ig"].runner
        ours, theirs = runner(model, torch_model, images, np.array([3]), config=NOTEBOOK)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
