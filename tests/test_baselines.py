"""Named and user baselines of the path methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxattr.methods.baselines import baseline_images, broadcast_baselines, check_baseline
from jaxattr.models import create_model


def _images(rng, b=2, size=4):
    return rng.rand(b, size, size, 3).astype(np.float32)


def test_baselines(rng):
    model = create_model("resnet18", weights=None, image_size=16)
    x = jnp.asarray(_images(rng, b=3, size=16))
    np.testing.assert_array_equal(baseline_images("black", model, x), np.zeros(x.shape))
    mean = baseline_images("mean", model, x)
    np.testing.assert_array_equal(mean, np.broadcast_to(np.float32(model.module.mean), x.shape))
    blurred = np.stack([scipy.ndimage.gaussian_filter(image, (2.0, 2.0, 0), mode="constant") for image in np.asarray(x)])
    np.testing.assert_allclose(baseline_images("blur", model, x, blur_sigma=2.0), blurred, atol=1e-6)


def test_uniform_baseline_is_keyed_per_image(rng):
    x = jnp.asarray(_images(rng, b=3, size=8))
    draw = lambda images, seed: np.asarray(baseline_images("uniform", None, images, key=jax.random.key(seed)))
    first = draw(x, 0)
    assert first.min() >= 0 and first.max() < 1 and first.shape == x.shape
    np.testing.assert_array_equal(first, draw(x, 0))
    np.testing.assert_array_equal(first[:2], draw(x[:2], 0))  # the batch does not change an image's draw
    assert not np.array_equal(first, draw(x, 1))
    with pytest.raises(ValueError, match="key"):
        baseline_images("uniform", None, x)


def test_mean_baseline_needs_a_model(rng):
    forward = jax.tree_util.Partial(lambda x: x.mean(axis=(1, 2)))
    with pytest.raises(TypeError, match="jaxattr Model"):
        baseline_images("mean", forward, jnp.asarray(_images(rng)))


def test_user_baselines_broadcast_or_explain(rng):
    x = jnp.asarray(_images(rng))
    assert broadcast_baselines(np.full(3, 0.5), x).shape == x.shape
    assert broadcast_baselines(x[0], x).shape == x.shape
    with pytest.raises(ValueError, match=r"do not broadcast to the images' shape \(2, 4, 4, 3\)"):
        broadcast_baselines(np.zeros((3, 4, 4, 3)), x)
    with pytest.raises(ValueError, match="expected one of .*black.*mean.*blur.*uniform"):
        check_baseline("white")
