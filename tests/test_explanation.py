"""`jaxattr.explain`'s Explanation fields for explicit targets (not only the predicted class)."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxattr

WEIGHTS = jnp.asarray(np.random.RandomState(0).randn(4 * 4 * 3, 5).astype(np.float32))


def _linear(images):
    return images.reshape(images.shape[0], -1) @ WEIGHTS


def test_probabilities_are_those_of_the_explained_classes():
    images = jnp.asarray(np.random.RandomState(1).rand(3, 4, 4, 3).astype(np.float32))
    probabilities = np.asarray(jax.nn.softmax(_linear(images), axis=-1))
    least_likely = probabilities.argmin(axis=-1)  # never the prediction
    result = jaxattr.explain(_linear, images, "saliency", targets=least_likely)
    np.testing.assert_array_equal(np.asarray(result.targets), least_likely)
    np.testing.assert_allclose(np.asarray(result.probabilities), probabilities[np.arange(3), least_likely], rtol=1e-6)
    assert np.all(np.asarray(result.probabilities) < probabilities.max(axis=-1))
    # The saliency of a linear model is its weight column of the target class.
    expected = np.asarray(WEIGHTS).T[least_likely].reshape(3, 4, 4, 3)
    np.testing.assert_allclose(np.asarray(result.attributions), expected, rtol=1e-6)
