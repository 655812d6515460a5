"""jaxattr.resize against torch.nn.functional.interpolate (the reference, run here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr.resize import interpolation_matrix, resize

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (input h, w) -> (output h, w): up, down, mixed, to and from a single cell, 7x7 -> 224 (IIA),
# 14 -> 224 (ViT maps x16), non-integer ratios.
SIZES = [
    ((7, 7), (224, 224)),
    ((14, 14), (224, 224)),
    ((224, 200), (56, 75)),
    ((9, 13), (13, 9)),
    ((1, 5), (4, 1)),
    ((14, 14), (10, 16)),
]
MODES = [
    ("bilinear", False, False),
    ("bilinear", True, False),
    ("bicubic", False, False),
    ("bicubic", True, False),
    ("bilinear", False, True),
    ("bicubic", False, True),
]


def torch_resize(x: np.ndarray, size, method, align_corners, antialias) -> np.ndarray:
    """NHWC numpy in and out; NCHW for torch."""
    out = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        size=size,
        mode=method,
        align_corners=align_corners,
        antialias=antialias,
    )
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("method, align_corners, antialias", MODES)
@pytest.mark.parametrize("size_in, size_out", SIZES)
def test_matches_torch_in_float64(rng, size_in, size_out, method, align_corners, antialias):
    x = rng.randn(2, *size_in, 3)
    ref = torch_resize(x, size_out, method, align_corners, antialias)
    with jax.enable_x64(True):
        got = np.asarray(
            resize(jnp.asarray(x), size_out, method, align_corners=align_corners, antialias=antialias)
        )
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method, align_corners, antialias", MODES)
@pytest.mark.parametrize("size_in, size_out", SIZES)
def test_matches_torch_in_float32(rng, size_in, size_out, method, align_corners, antialias):
    # float32 rounding differs (torch interpolates 2-D per pixel, we apply two matrices): a few ulp
    # of the unit-normal data, and torch's own error vs the exact float64 result is of that size.
    x = rng.randn(2, *size_in, 3).astype(np.float32)
    ref = torch_resize(x, size_out, method, align_corners, antialias)
    got = np.asarray(
        resize(jnp.asarray(x), size_out, method, align_corners=align_corners, antialias=antialias)
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_maps_without_channels_and_jax_image_resize_differs_for_bicubic(rng):
    maps = rng.randn(3, 7, 7).astype(np.float32)
    ref = torch_resize(maps[..., None], (224, 224), "bicubic", False, False)[..., 0]
    got = np.asarray(resize(jnp.asarray(maps), 224, "bicubic"))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # The reason this module exists: jax.image.resize's cubic kernel is not torch's (iia.md §5).
    other = np.asarray(jax.image.resize(jnp.asarray(maps), (3, 224, 224), "cubic", antialias=False))
    assert np.abs(other - ref).max() > 1e-2


def test_differentiable_and_jittable(rng):
    x = jnp.asarray(rng.randn(1, 5, 6, 2).astype(np.float32))
    f = jax.jit(lambda v: resize(v, (9, 4), "bicubic", align_corners=True).sum())
    grad = jax.grad(f)(x)
    # The gradient of a sum of a linear map: column sums of the two interpolation matrices.
    rows = interpolation_matrix(5, 9, "bicubic", align_corners=True).sum(0)
    cols = interpolation_matrix(6, 4, "bicubic", align_corners=True).sum(0)
    np.testing.assert_allclose(
        np.asarray(grad),
        np.broadcast_to((rows[:, None] * cols[None, :])[None, :, :, None], x.shape),
        rtol=1e-5,
    )


def test_same_size_is_identity(rng):
    x = jnp.asarray(rng.randn(2, 6, 6, 3).astype(np.float32))
    for method in ("bilinear", "bicubic"):
        np.testing.assert_array_equal(np.asarray(resize(x, 6, method)), np.asarray(x))


def test_bad_input_errors(rng):
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="unknown resize method"):
        resize(x, 8, "nearest")
    with pytest.raises(ValueError, match="batch, height, width"):
        resize(jnp.zeros((4, 4)), 8)
    with pytest.raises(TypeError, match="floating"):
        resize(jnp.zeros((1, 4, 4), jnp.int32), 8)
    with pytest.raises(ValueError, match="antialias"):
        resize(x, 2, antialias=True, align_corners=True)
    with pytest.raises(ValueError, match="positive"):
        resize(x, (0, 3))
    with pytest.raises(ValueError, match="size must be"):
        resize(x, (1, 2, 3))
