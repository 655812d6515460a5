"""jaxattr.blur against scipy.ndimage.gaussian_filter (the blur of PAIR's Blur IG and of RISE's kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxattr.blur import (
    axis_blur,
    blur_axes,
    blur_matrix,
    gaussian_blur,
    gaussian_kernel,
    kernel_radius,
    toeplitz,
    toeplitz_blur,
    zero_padded_kernels,
)

# 0: no blur; 0.05, 0.124: radius 0 (identity); 3 on 7 px and 50: kernels wider than the image.
SIGMAS = [0.0, 0.05, 0.124, 0.2, 0.5, 1.0, 1.7, 3.0, 10.0, 50.0, (2.0, 0.0), (0.3, 4.0)]


def scipy_blur(images: np.ndarray, sigma, mode: str) -> np.ndarray:
    sigma_h, sigma_w = (sigma, sigma) if np.ndim(sigma) == 0 else sigma
    return np.stack([ndimage.gaussian_filter(image, (sigma_h, sigma_w, 0), mode=mode) for image in images])


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror"])
@pytest.mark.parametrize("sigma", SIGMAS, ids=str)
def test_float32_blur_is_scipys_to_the_bit(rng, mode, sigma):
    # SciPy sums each axis in float64 and rounds once; the exact float32 scheme does the same.
    images = np.concatenate([rng.rand(1, 7, 9, 3), rng.randn(1, 7, 9, 3)]).astype(np.float32)
    blur = jax.jit(gaussian_blur, static_argnames=("sigma", "mode"))
    ours = np.asarray(blur(images, sigma=sigma, mode=mode))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, scipy_blur(images, sigma, mode))


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror"])
@pytest.mark.parametrize("sigma", [0.7, 4.0, 50.0])
def test_float32_blur_is_exact_on_a_larger_non_square_image(rng, mode, sigma):
    images = rng.rand(1, 64, 48, 3).astype(np.float32)
    ours = np.asarray(gaussian_blur(images, sigma, mode=mode))
    np.testing.assert_array_equal(ours, scipy_blur(images, sigma, mode))


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror"])
@pytest.mark.parametrize("sigma", SIGMAS, ids=str)
def test_float64_blur_matches_scipy(rng, mode, sigma):
    images = rng.randn(2, 7, 9, 3)
    with jax.enable_x64(True):
        ours = np.asarray(gaussian_blur(jnp.asarray(images), sigma, mode=mode))
    assert ours.dtype == np.float64
    # Both sum in float64, in different orders.
    expected = scipy_blur(images, sigma, mode)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-15 * np.abs(images).max())


def test_sigma_zero_and_tiny_sigma_return_the_input(rng):
    images = rng.rand(1, 5, 6, 3).astype(np.float32)
    assert kernel_radius(0.124) == 0 and kernel_radius(0.125) == 1
    for sigma in (0.0, 0.01, 0.124):
        np.testing.assert_array_equal(np.asarray(gaussian_blur(images, sigma)), images)


def test_kernel_and_radius_follow_scipy():
    for sigma in (0.3, 1.0, 2.5, 7.9):
        weights = gaussian_kernel(sigma)
        assert len(weights) == 2 * int(4.0 * sigma + 0.5) + 1
        delta = np.zeros(len(weights))
        delta[len(weights) // 2] = 1.0
        np.testing.assert_array_equal(weights, ndimage.gaussian_filter1d(delta, sigma, mode="constant"))


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror"])
@pytest.mark.parametrize("size, sigma", [(11, 5.0), (4, 9.0), (1, 2.0), (16, 0.8)])
def test_blur_matrix_is_the_filter_of_the_unit_vectors(mode, size, sigma):
    expected = ndimage.gaussian_filter1d(np.eye(size), sigma, axis=0, mode=mode)
    np.testing.assert_allclose(blur_matrix(size, sigma, mode=mode), expected, rtol=0, atol=4e-16)


def test_rise_kernel_row():
    # metrics.md §1: k1 = gaussian_filter1d of an 11-sample delta, sigma 5, mode 'reflect'.
    k1 = [0.08795815, 0.08889612, 0.0904742, 0.09219112, 0.09348939, 0.09398206]
    k1 = np.array(k1 + k1[-2::-1])
    np.testing.assert_allclose(blur_matrix(11, 5.0, mode="reflect")[:, 5], k1, atol=5e-9)


def test_zero_padded_kernels_give_the_constant_mode_matrices():
    sigmas = [0.0, 0.06, 0.8, 3.0, 40.0]
    with jax.enable_x64(True):
        matrices = np.asarray(toeplitz(jnp.asarray(zero_padded_kernels(sigmas, 9)), 9))
    for sigma, matrix in zip(sigmas, matrices):
        np.testing.assert_array_equal(matrix, blur_matrix(9, sigma))


def test_a_kernel_table_blurs_like_gaussian_blur(rng):
    images = rng.rand(2, 12, 10, 3).astype(np.float32)
    sigmas = [0.5, 2.0, 30.0]
    rows = axis_blur(zero_padded_kernels(sigmas, 12), 12, jnp.float32)
    cols = axis_blur(zero_padded_kernels(sigmas, 10), 10, jnp.float32)
    def blur(i):
        return blur_axes(images, toeplitz_blur(rows, i, 12), toeplitz_blur(cols, i, 10))

    blurred = jax.jit(jax.vmap(blur))(jnp.arange(len(sigmas)))
    for sigma, ours in zip(sigmas, blurred):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(gaussian_blur(images, sigma)))


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror"])
def test_blur_is_differentiable(rng, mode):
    # The blur is linear: its VJP applies the transposed filter matrices.
    images = rng.rand(1, 6, 5, 3).astype(np.float32)
    cotangent = rng.randn(1, 6, 5, 3).astype(np.float32)
    _, vjp = jax.vjp(lambda x: gaussian_blur(x, (1.3, 0.9), mode=mode), jnp.asarray(images))
    (grad,) = vjp(jnp.asarray(cotangent))
    rows, cols = blur_matrix(6, 1.3, mode=mode), blur_matrix(5, 0.9, mode=mode)
    # y = R x C^T per channel, so the cotangent maps back as R^T y C.
    expected = np.einsum("ij,cik,kl->cjl", rows, np.moveaxis(cotangent[0], 2, 0), cols)
    np.testing.assert_allclose(np.asarray(grad)[0], np.moveaxis(expected, 0, 2), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_rejected(rng):
    images = rng.rand(1, 4, 4, 3).astype(np.float32)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gaussian_blur(images, -1.0)
    with pytest.raises(ValueError, match="sigma must be finite"):
        gaussian_blur(images, float("nan"))
    with pytest.raises(ValueError, match=r"\(height, width\) pair"):
        gaussian_blur(images, (1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="unknown blur mode 'wrap'"):
        gaussian_blur(images, 1.0, mode="wrap")
    with pytest.raises(ValueError, match="NHWC batch"):
        gaussian_blur(images[0], 1.0)
    with pytest.raises(ValueError, match="floating-point"):
        gaussian_blur(images.astype(np.int32), 1.0)
