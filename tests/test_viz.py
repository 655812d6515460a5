"""Colormap, overlays, panels and atomic PNG writing."""

import os

import numpy as np
import pytest
from PIL import Image

from jaxattr import viz


def test_turbo_follows_the_published_colormap():
    matplotlib = pytest.importorskip("matplotlib")  # holds Google's 256-entry Turbo table
    x = np.linspace(0.0, 1.0, 256)
    reference = matplotlib.colormaps["turbo"](x)[:, :3]
    error = np.abs(viz.turbo(x) - reference)
    # The polynomial is a fit: close on average, coarsest at the dark-blue end.
    assert error.mean() < 0.03 and error.max() < 0.13


def test_turbo_runs_blue_green_red():
    low, middle, high = viz.turbo(np.array([0.1, 0.5, 0.9]))
    assert low.argmax() == 2 and middle.argmax() == 1 and high.argmax() == 0


def test_turbo_shape_range_and_clipping():
    values = np.array([[-1.0, 0.0, 0.3], [1.0, 2.0, 0.7]])
    colours = viz.turbo(values)
    assert colours.shape == (2, 3, 3) and colours.dtype == np.float32
    assert colours.min() >= 0.0 and colours.max() <= 1.0
    np.testing.assert_array_equal(colours[0, 0], colours[0, 1])  # -1 is clipped to 0
    np.testing.assert_array_equal(colours[1, 1], colours[1, 0])  # 2 is clipped to 1


def test_turbo_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        viz.turbo(np.array([0.5, np.nan]))


def test_resize_heatmap():
    heatmap = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    resized = viz.resize_heatmap(heatmap, (4, 6))
    assert resized.shape == (4, 6)
    assert resized[:, 0].max() < 0.2 and resized[:, -1].min() > 0.8  # left stays low, right high
    np.testing.assert_array_equal(viz.resize_heatmap(np.full((3, 5), 0.25), (7, 2)), np.full((7, 2), 0.25))
    with pytest.raises(ValueError, match="2-D"):
        viz.resize_heatmap(np.zeros((2, 2, 1)), (4, 4))


def test_overlay_blends_the_resized_coloured_heatmap_by_its_heat():
    rng = np.random.default_rng(0)
    image = rng.random((8, 6, 3)).astype(np.float32)
    heatmap = rng.random((4, 3)).astype(np.float32)
    heat = viz.resize_heatmap(heatmap, (8, 6))[..., None]
    colours = viz.turbo(heat[..., 0])
    np.testing.assert_allclose(viz.overlay(image, heatmap, alpha=0.0), image)
    np.testing.assert_allclose(viz.overlay(image, heatmap, alpha=1.0), (1 - heat) * image + heat * colours, rtol=1e-6)
    weight = 0.25 * heat
    np.testing.assert_allclose(
        viz.overlay(image, heatmap, alpha=0.25), (1 - weight) * image + weight * colours, rtol=1e-6
    )
    cold, hot = np.zeros((4, 3), np.float32), np.ones((4, 3), np.float32)
    np.testing.assert_allclose(viz.overlay(image, cold, alpha=0.5), image)  # no heat: the photo as is
    np.testing.assert_allclose(viz.overlay(image, hot, alpha=1.0), viz.turbo(np.ones((8, 6), np.float32)))
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, heatmap, alpha=1.5)
    with pytest.raises(ValueError, match="RGB image"):
        viz.overlay(image[..., 0], heatmap)


def test_panel_is_image_heatmap_overlay_side_by_side():
    rng = np.random.default_rng(1)
    image = rng.random((5, 7, 3)).astype(np.float32)
    heatmap = rng.random((5, 7)).astype(np.float32)
    tiles = viz.panel(image, heatmap, alpha=0.4, gap=2)
    assert tiles.shape == (5, 3 * 7 + 2 * 2, 3)
    np.testing.assert_array_equal(tiles[:, :7], image)
    np.testing.assert_array_equal(tiles[:, 7:9], 1.0)
    np.testing.assert_array_equal(tiles[:, 9:16], viz.turbo(heatmap))
    np.testing.assert_allclose(tiles[:, 18:], viz.overlay(image, heatmap, alpha=0.4))


def test_to_uint8_rounds_and_clips():
    values = np.array([[[-0.1, 0.0, 0.5], [1 / 255 * 0.49, 1 / 255 * 0.51, 1.2]]], np.float32)
    np.testing.assert_array_equal(viz.to_uint8(values), [[[0, 0, 128], [0, 1, 255]]])


def test_save_png_round_trip(tmp_path):
    image = np.random.default_rng(2).random((6, 9, 3)).astype(np.float32)
    path = tmp_path / "deep" / "out.png"  # parents are created
    viz.save_png(path, image)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(written), viz.to_uint8(image))
    assert os.listdir(path.parent) == ["out.png"]  # no temporary file left behind


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.bin"
    path.write_bytes(b"old")

    def failing_write(f):
        f.write(b"half of the new cont")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        viz.write_atomically(path, failing_write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["result.bin"]
    viz.write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["result.bin"]
