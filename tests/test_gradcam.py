"""Grad-CAM and guided backprop against captum on random torchvision models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.crosscheck import references, run
from converters.torch_models import torch_twin
from jaxattr import GradCamConfig, gradcam, guided_backprop
from jaxattr.methods.gradcam import tokens_to_grid


@pytest.fixture(scope="module")
def resnet18():
    torch_model, model = torch_twin("resnet18")
    return model, torch_model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradcam_matches_captum(resnet18, rng, dtype):
    model, torch_model = resnet18
    images = rng.rand(2, 64, 64, 3)
    result = run("gradcam", model, torch_model, images, dtype=dtype)
    assert result.ok, result


def test_gradcam_at_an_inner_layer_matches_captum(resnet18, rng):
    model, torch_model = resnet18
    images = rng.rand(2, 48, 48, 3).astype(np.float32)
    targets = np.array([3, 7])
    ours, theirs = references()["gradcam"].runner(model, torch_model, images, targets, layer="layer3.0")
    assert ours.shape == (2, 3, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_guided_backprop_matches_captum(resnet18, rng, dtype):
    model, torch_model = resnet18
    result = run("guided_backprop", model, torch_model, rng.rand(2, 32, 32, 3), dtype=dtype)
    assert result.ok, result


def test_guided_backprop_differs_from_plain_gradient(resnet18, rng):
    model, _ = resnet18
    images = rng.rand(1, 32, 32, 3).astype(np.float32)
    guided = np.asarray(guided_backprop(model, images, 0))
    plain = np.asarray(jax.grad(lambda x: model(x)[0, 0])(images))
    assert not np.allclose(guided, plain)


def test_gradcam_without_relu_is_the_signed_map(resnet18, rng):
    model, _ = resnet18
    images = rng.rand(2, 32, 32, 3).astype(np.float32)
    signed = np.asarray(gradcam(model, images, 5, config=GradCamConfig(relu=False)))
    rectified = np.asarray(gradcam(model, images, 5))
    np.testing.assert_array_equal(rectified, np.maximum(signed, 0))


def test_tokens_to_grid_drops_the_class_token():
    tokens = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(grid[:, 0, 1], tokens[:, 2])
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_grid(tokens[:, :15])


def test_gradcam_needs_a_model(rng):
    with pytest.raises(TypeError, match="pass a jaxattr Model"):
        gradcam(lambda x: x.sum(axis=(1, 2)), rng.rand(1, 8, 8, 3).astype(np.float32))


def test_a_hand_built_model_has_its_architectures_default_layer(resnet18, rng):
    # The default feature layer is declared by the architecture, not looked up by registry name.
    model, _ = resnet18
    unnamed = dataclasses.replace(model, name="")
    images = rng.rand(1, 32, 32, 3).astype(np.float32)
    assert unnamed.feature_layer == "layer4"
    np.testing.assert_array_equal(gradcam(unnamed, images, 2), gradcam(model, images, 2))
    np.testing.assert_array_equal(gradcam(unnamed, images, 2), gradcam(model, images, 2, config=GradCamConfig(layer="layer4")))
