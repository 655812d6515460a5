"""Saliency maps and their display contrast against PAIR saliency's visualisation functions and
GNL's formula; maps stay unclipped, contrast belongs to display."""

import numpy as np
import pytest

from jaxattr import maps, viz
from jaxattr.maps import Contrast

saliency = pytest.importorskip("saliency.core")


@pytest.fixture
def attributions(rng):
    return (rng.randn(3, 20, 24, 3) * rng.rand(3, 1, 1, 1) * 5).astype(np.float32)


def test_grayscale_contrast_matches_pair(attributions):
    ours = viz.contrast(np.asarray(maps.abs_sum(attributions)), Contrast("min", 99.0))
    for a, m in zip(attributions, ours):
        np.testing.assert_allclose(m, saliency.VisualizeImageGrayscale(a), rtol=0, atol=8e-7)


def test_diverging_matches_pair(attributions):
    ours = viz.diverging(np.asarray(maps.channel_sum(attributions)))
    for a, m in zip(attributions, ours):
        np.testing.assert_allclose(m, saliency.VisualizeImageDiverging(a), rtol=0, atol=8e-7)


def test_abs_of_sum_scaled_by_its_maximum_is_gnls_heatmap(attributions):
    expected = np.abs(attributions.sum(-1))
    expected /= expected.max(axis=(1, 2), keepdims=True)
    got = viz.contrast(np.asarray(maps.abs_of_sum(attributions)), Contrast("zero", 100.0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_display_contrast_clips_at_the_percentile_but_the_map_does_not(attributions):
    m = np.abs(attributions.sum(-1))
    scale = np.percentile(m, 99, axis=(1, 2), keepdims=True)
    got = viz.contrast(np.asarray(maps.abs_of_sum(attributions)), Contrast("zero", 99.0))
    np.testing.assert_allclose(got, np.clip(m / scale, 0, 1), rtol=0, atol=1e-6)
    assert (got == 1).mean() >= 0.01 - 1e-9  # the top 1 % saturate in the picture ...
    raw = np.asarray(maps.abs_of_sum(attributions))
    assert len(np.unique(raw)) == raw.size  # ... while the map itself keeps every pixel's rank


def test_constant_maps_give_zeros_not_nan():
    flat = np.zeros((1, 4, 4), np.float32)
    for scale in (Contrast("min", 99.0), Contrast("zero", 99.0), Contrast("min", 100.0)):
        np.testing.assert_array_equal(viz.contrast(flat + 1.0, scale) if scale.floor == "min" else viz.contrast(flat, scale), 0)
