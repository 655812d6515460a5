"""jaxattr.evaluation: evaluate_maps against the metrics called one by one, the I-GOS metric's
inputs (cells of a saliency map against torch's adaptive average pooling, the blurred baseline
against SciPy), the per-image storage round trip, and the ground-truth masks' geometry against
torchvision's transforms."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import jax
import jax.numpy as jnp

from jaxattr import evaluation, metrics
from jaxattr.image import preprocess_labels
from jaxattr.methods.igos import igos_baselines
from jaxattr.models import model_info

SIZE = 16
FILL = np.full(3, 0.4, np.float32)
OPTIONS = dict(step=32, chunk=4, fill=FILL, mask_size=4)  # one compiled program per metric for every test


def _forward(p, x):
    h = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return 4 * jax.nn.relu(h).mean(axis=(1, 2)) @ p["d"]


def tiny_forward():
    """A small conv net as a pytree callable (no normalisation: the fill is explicit). One module
    level function, so every test shares the compiled programs."""
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"w": jax.random.normal(k1, (3, 3, 3, 6)), "d": jax.random.normal(k2, (6, 4))}
    return jax.tree_util.Partial(_forward, params)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    images = rng.rand(3, SIZE, SIZE, 3).astype(np.float32)
    maps = rng.rand(3, SIZE, SIZE).astype(np.float32)
    truth = rng.rand(3, SIZE, SIZE) > 0.6
    return images, maps, truth


@pytest.fixture(scope="module")
def results(batch):
    images, maps, truth = batch
    return evaluation.evaluate_maps(tiny_forward(), images, maps, jnp.array([1, 0, 3]), metrics=tuple(evaluation.METRIC_GROUPS),
                                    baselines=lambda x: x * 0.5, ground_truth=truth, **OPTIONS)


def _equal(a, b):
    for field in vars(a):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field)


def test_evaluate_maps_equals_the_metrics_one_by_one(batch, results):
    images, maps, truth = batch
    model, fill, targets = tiny_forward(), FILL, jnp.array([1, 0, 3])
    baselines = images * 0.5
    cells = evaluation.saliency_cells(maps, 4)
    expected = {
        "rise_deletion": metrics.rise_deletion(model, images, maps, targets, fill=fill, step=32, chunk=4),
        "rise_insertion": metrics.rise_insertion(model, images, maps, targets, fill=fill, step=32, chunk=4),
        "igos_deletion": metrics.igos_deletion(model, images, cells, baselines, targets, chunk=4),
        "igos_insertion": metrics.igos_insertion(model, images, cells, baselines, targets, chunk=4),
        "positive": metrics.perturbation_curves(model, images, maps, targets, mode="positive", fill=fill, chunk=4),
        "negative": metrics.perturbation_curves(model, images, maps, targets, mode="negative", fill=fill, chunk=4),
        "confidence": metrics.confidence_change(model, images, maps, targets, fill=fill),
        "segmentation": metrics.segmentation_scores(maps, truth),
    }
    assert list(results) == list(expected)
    for key in expected:
        _equal(results[key], expected[key])
    # Every score name the groups promise is what the report makes of the results.
    from jaxattr.report import method_records

    assert list(method_records("m", results).scores) == evaluation.score_names(tuple(evaluation.METRIC_GROUPS))


def test_igos_masks_seam_scores_the_given_masks(batch):
    """I-GOS's own masks replace the cells of the map (here: a mask that disagrees with it)."""
    images, maps, _ = batch
    model = tiny_forward()
    masks = np.random.RandomState(5).rand(3, 4, 4).astype(np.float32)
    given = evaluation.evaluate_maps(model, images, maps, metrics=["igos"], igos_masks=masks, baselines=images * 0.5, **OPTIONS)
    direct = metrics.igos_deletion(model, images, masks, images * 0.5, chunk=4)
    _equal(given["igos_deletion"], direct)
    pooled = evaluation.evaluate_maps(model, images, maps, metrics=["igos"], baselines=images * 0.5, **OPTIONS)
    assert not np.array_equal(pooled["igos_deletion"].scores, direct.scores)


def test_a_nan_map_spoils_only_its_row(batch):
    images, maps, truth = batch
    bad = maps.copy()
    bad[1, 2, 3] = np.inf
    scored = evaluation.evaluate_maps(tiny_forward(), images, bad, metrics=["igos", "confidence", "segmentation"],
                                      baselines=images * 0.5, ground_truth=truth, **OPTIONS)
    assert evaluation.valid_rows(scored).tolist() == [True, False, True]
    score = np.asarray(scored["igos_insertion"].score)
    assert np.isnan(score[1]) and np.isfinite(score[[0, 2]]).all()


def test_metric_names_are_checked(batch):
    images, maps, _ = batch
    with pytest.raises(ValueError, match="unknown metric deletion; metrics: rise, igos"):
        evaluation.evaluate_maps(tiny_forward(), images, maps, metrics=["rise", "deletion"])
    with pytest.raises(ValueError, match="needs ground_truth"):
        evaluation.evaluate_maps(tiny_forward(), images, maps, metrics=["segmentation"])
    assert evaluation.check_metrics(["segmentation", "rise", "rise"]) == ("rise", "segmentation")


@pytest.mark.parametrize("shape,size", [((16, 16), 4), ((30, 17), 7), ((9, 9), 9), ((12, 20), 1)])
def test_saliency_cells_are_minus_torch_adaptive_average_pooling(shape, size):
    maps = np.random.RandomState(1).rand(2, *shape).astype(np.float32)
    ours = evaluation.saliency_cells(maps, size)
    reference = -torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(maps)[:, None], size)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mask size must be an integer from 1 to the maps' side"):
        evaluation.saliency_cells(maps, min(shape) + 1)


def test_the_igos_metric_defaults_to_igos_baselines(batch):
    """The I-GOS metric's substrate is the I-GOS method's baseline (tested in test_igos.py), one function."""
    images, maps, _ = batch
    model = tiny_forward()
    masks = np.random.RandomState(6).rand(3, 4, 4).astype(np.float32)
    scored = evaluation.evaluate_maps(model, images, maps, metrics=["igos"], igos_masks=masks, **OPTIONS)
    _equal(scored["igos_insertion"], metrics.igos_insertion(model, images, masks, igos_baselines(images), chunk=4))


def test_result_rows_round_trip(results):
    rows = evaluation.result_rows(results, 3)
    assert len(rows) == 3 and rows[0]["rise_deletion.fractions"].shape == (9,)
    for key, value in evaluation.stack_rows(rows).items():
        _equal(value, results[key])
    reordered = evaluation.stack_rows([rows[2], rows[0]])
    np.testing.assert_array_equal(reordered["positive"].accuracy_auc, np.asarray(results["positive"].accuracy_auc)[[2, 0]])
    assert evaluation.result_rows(results, 2)[1].keys() == rows[1].keys()


@pytest.mark.parametrize("mode", ["P", "L", "1"])
def test_mask_geometry_is_torchvisions_nearest_resize_and_crop(mode):
    """A label image of the original's size through the eval transform's geometry, NEAREST, values kept."""
    info = model_info("resnet18")  # Resize(256) + CenterCrop(224)
    labels = np.zeros((300, 410), np.uint8)
    labels[40:200, 100:330] = 7
    labels[120:130, :] = 255  # a VOC-style boundary value
    image = Image.fromarray(labels)
    if mode == "P":
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    elif mode == "1":
        image = image.convert("1")
    transform = T.Compose([T.Resize(info.resize_size, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(info.image_size)])
    ours = preprocess_labels(image, info)
    np.testing.assert_array_equal(ours, np.asarray(transform(image)))
    assert ours.shape == (224, 224)
    if mode == "P":  # palette indices, not colours
        assert set(np.unique(ours)) == {0, 7, 255}
