"""Display heatmaps against PAIR saliency's visualisation functions and GNL's formula."""

import numpy as np
import pytest

from jaxattr import heatmaps

saliency = pytest.importorskip("saliency.core")


@pytest.fixture
def attributions(rng):
    return (rng.randn(3, 20, 24, 3) * rng.rand(3, 1, 1, 1) * 5).astype(np.float32)


def test_grayscale_matches_pair(attributions):
    ours = np.asarray(heatmaps.grayscale(attributions))
    for a, m in zip(attributions, ours):
        np.testing.assert_allclose(m, saliency.VisualizeImageGrayscale(a), rtol=0, atol=8e-7)


def test_diverging_matches_pair(attributions):
    ours = np.asarray(heatmaps.diverging(attributions))
    for a, m in zip(attributions, ours):
        np.testing.assert_allclose(m, saliency.VisualizeImageDiverging(a), rtol=0, atol=8e-7)


def test_abs_channel_sum_is_gnls_heatmap(attributions):
    expected = np.abs(attributions.sum(-1))
    expected /= expected.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(heatmaps.abs_channel_sum(attributions)), expected, rtol=0, atol=1e-6)


def test_display_contrast_clips_at_the_percentile(attributions):
    m = np.abs(attributions.sum(-1))
    scale = np.percentile(m, 99, axis=(1, 2), keepdims=True)
    expected = np.clip(m / scale, 0, 1)
    got = np.asarray(heatmaps.abs_channel_sum(attributions, percentile=99.0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (got == 1).mean() >= 0.01 - 1e-9  # the top 1 % saturate


def test_constant_maps_give_zeros_not_nan():
    flat = np.zeros((1, 4, 4, 3), np.float32)
    for fn in (heatmaps.grayscale, heatmaps.abs_channel_sum):
        np.testing.assert_array_equal(np.asarray(fn(flat)), 0)
    np.testing.assert_array_equal(np.asarray(heatmaps.min_max(np.ones((1, 4, 4), np.float32))), 0)
