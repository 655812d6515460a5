"""One intervention API over named sites: read, replace by a constant, perturb for gradients,
several sites per call; taps and heads are its special case; normalisation is exposed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr.methods.sites import site_gradients
from jaxattr.models import create_model


@pytest.fixture(scope="module")
def model():
    return create_model("resnet18", weights=None, image_size=32)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32))


def test_sites_are_the_stage_outputs(model):
    assert model.sites == model.layers
    assert model.feature_layer == "layer4" and model.resolve_site("layer4") == "layer4.1"


def test_read_several_sites_in_one_pass(model, images):
    logits, values = model.intervene(images, read=["layer2", "layer4", "fc"])
    assert sorted(values) == ["fc", "layer2.1", "layer4.1"]
    np.testing.assert_array_equal(values["fc"], logits)
    for layer in ("layer2.1", "layer4.1"):
        activation, head = model.tap(images, layer)
        np.testing.assert_array_equal(values[layer], activation)
        np.testing.assert_allclose(head(activation), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(logits, model(images))


def test_replacing_a_stage_output_runs_the_rest_on_the_constant(model, images):
    activation, head = model.tap(images, "layer3")
    other = activation[::-1] * 0.5
    logits, values = model.intervene(images, replace={"layer3": other}, read=["layer3"])
    np.testing.assert_array_equal(values["layer3.1"], other)
    np.testing.assert_allclose(logits, head(other), rtol=1e-6, atol=1e-6)
    # A constant: nothing flows back to the input through it.
    grad = jax.grad(lambda x: model.intervene(x, replace={"layer3": other})[0].sum())(images)
    assert not np.any(np.asarray(grad))


def test_perturbing_by_zero_gives_the_gradient_at_the_site(model, images):
    targets = jnp.array([3, 7])
    logits, values, grads = site_gradients(model, images, targets, ["layer3", "layer4"])
    np.testing.assert_array_equal(logits, model(images))
    for layer in ("layer3.1", "layer4.1"):
        activation, head = model.tap(images, layer)
        expected = jax.grad(lambda a: jnp.take_along_axis(head(a), targets[:, None], 1).sum())(activation)
        np.testing.assert_allclose(grads[layer], expected, rtol=1e-5, atol=1e-7 * float(jnp.abs(expected).max()))
        np.testing.assert_array_equal(values[layer], activation)


def test_a_perturbation_shifts_the_site(model, images):
    activation, head = model.tap(images, "layer4")
    offset = jnp.full(activation.shape, 0.25)
    logits, _ = model.intervene(images, perturb={"layer4": offset})
    np.testing.assert_allclose(logits, head(activation + offset), rtol=1e-6, atol=1e-6)


def test_normalisation_is_exposed_and_exact(model, images):
    np.testing.assert_array_equal(model.from_normalised(model.normalise(images)), model(images))
    assert model.mean == (0.485, 0.456, 0.406)
    np.testing.assert_allclose(model.normalise(jnp.broadcast_to(jnp.asarray(model.mean), (1, 2, 2, 3))), 0, atol=1e-7)


def test_bad_sites_are_explained(model, images):
    with pytest.raises(ValueError, match="unknown layer 'layer9'.*layers: conv1"):
        model.intervene(images, read=["layer9"])
    with pytest.raises(ValueError, match=r"must have its shape \(2, 1, 1, 512\)"):
        model.intervene(images, replace={"layer4": jnp.zeros((2, 2, 2, 512))})
    with pytest.raises(ValueError, match="not reached before stop='layer2.1'"):
        model.intervene(images, read=["layer4"], stop="layer2")
    with pytest.raises(TypeError, match="pass a jaxattr Model"):
        site_gradients(jax.tree_util.Partial(lambda x: x), images, 0, ["layer4"])
