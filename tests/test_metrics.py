"""Faithfulness metrics against independent PyTorch loops written here from metrics.md, on a random
ResNet-18 twin; analytic games; segmentation scores against sklearn and hand counts.

The torch side works as the references do: on the normalised tensor, one image and one forward pass
per curve point, zeros for "removed". jaxattr works in pixel space with the model's mean colour,
batched. The twin's classifier weights are scaled by 5 so that probabilities spread over (0, 1) and
the curves move (a random ResNet is otherwise nearly uniform)."""

import json
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxattr import metrics
from jaxattr.metrics import segmentation
from jaxattr.metrics._common import descending_ranks, ascending_ranks
from _devices import report_on_four_devices

torch = pytest.importorskip("torch")
scipy_ndimage = pytest.importorskip("scipy.ndimage")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

from converters.torch_models import from_torch, to_torch_images, torch_model  # noqa: E402

SIZE = 32
TOL = 1e-5  # float32, per curve point (probabilities)


@pytest.fixture(scope="module")
def twin():
    """(jaxattr model, torch model on NORMALISED input, mean, std) with the same weights."""
    net = torch_model("resnet18")
    with torch.no_grad():
        net.fc.weight.mul_(5)
        net.fc.bias.mul_(5)
    model = from_torch("resnet18", net)
    return model, net.eval(), np.asarray(model.module.mean), np.asarray(model.module.std)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(2, SIZE, SIZE, 3).astype(np.float32)


@pytest.fixture(scope="module")
def maps():
    # Continuous random values: no ties, so NumPy's and torch's unstable sorts agree with jaxattr's.
    return np.random.RandomState(1).rand(2, SIZE, SIZE).astype(np.float32)


def normalised(images, mean, std):
    """NHWC pixels -> the NCHW tensor the reference feeds its model, (x - mean) / std in float32."""
    as_t = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1).float()
    return (to_torch_images(images) - as_t(mean)) / as_t(std)


def probability(net, x, c):
    return float(probabilities(net, x, c)[0])


def probabilities(net, x, c):
    """Softmax probability of class c for each image of the batch x, float64 NumPy."""
    with torch.no_grad():
        return torch.softmax(net(x), dim=1)[:, c].double().numpy()


# ------------------------------------------------------------------------- RISE (metrics.md §1)


def rise_blur_reference(x):
    """RISE's substrate: conv2d with SciPy's gaussian_filter of an 11x11 delta (sigma 5) per channel."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = torch.from_numpy(scipy_ndimage.gaussian_filter(delta, 5).astype(np.float32))
    weight = torch.zeros(3, 3, 11, 11)
    for ch in range(3):
        weight[ch, ch] = k
    return torch.nn.functional.conv2d(x, weight, padding=5)


def rise_reference(net, x, saliency, game, step):
    """RISE's single-image loop: the image after each in-place substitution of `step` pixels. The
    images are collected and scored in one batch (eval mode: the same numbers as one per forward)."""
    hw = x.shape[2] * x.shape[3]
    with torch.no_grad():
        c = int(net(x).argmax(1))
        if game == "deletion":
            current, target = x.clone(), torch.zeros_like(x)
        else:
            current, target = rise_blur_reference(x), x.clone()
    order = torch.from_numpy(np.argsort(saliency.reshape(-1))[::-1].copy())  # NumPy default sort, reversed
    steps = (hw + step - 1) // step
    flat_current, flat_target = current.view(3, hw), target.view(3, hw)
    states = []
    for i in range(steps + 1):
        states.append(current.clone())
        idx = order[step * i : step * (i + 1)]
        flat_current[:, idx] = flat_target[:, idx]
    scores = probabilities(net, torch.cat(states), c)
    return scores, (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1), c


def test_rise_kernel_is_scipys_reflect_folded_gaussian():
    k1 = metrics.rise_kernel()
    delta = np.zeros(11)
    delta[5] = 1
    # Equal up to float64 summation order (the 20 px reflected taps are added in another order).
    np.testing.assert_allclose(k1, scipy_ndimage.gaussian_filter1d(delta, 5), rtol=1e-15, atol=0)
    np.testing.assert_allclose(k1[[0, 5]], [0.08795815, 0.09398206], atol=5e-9)  # metrics.md §1
    delta2 = np.zeros((11, 11))
    delta2[5, 5] = 1
    k = scipy_ndimage.gaussian_filter(delta2, 5)
    np.testing.assert_allclose(np.outer(k1, k1), k, rtol=1e-14)
    assert abs(k[5, 5] - 0.008833) < 5e-7 and abs(k[0, 0] - 0.007737) < 5e-7


def test_rise_blur_vs_torch_conv(twin, images):
    model, _, mean, std = twin
    ours = metrics.rise_blur(jnp.asarray(images), jnp.asarray(mean))
    theirs = rise_blur_reference(normalised(images, mean, std)).numpy().transpose(0, 2, 3, 1) * std + mean
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-6)


@pytest.mark.parametrize("game", ["deletion", "insertion"])
def test_rise_vs_reference_loop(twin, images, maps, game):
    model, net, mean, std = twin
    step = 64  # 16 steps, 17 points at 32 x 32
    fn = metrics.rise_deletion if game == "deletion" else metrics.rise_insertion
    # Deletion with the default chunk (16 points per pass: a loop and a remainder), insertion in one pass.
    ours = fn(model, images, maps, step=step, chunk=metrics.DEFAULT_CHUNK if game == "deletion" else None)
    assert ours.scores.shape == (2, 17) and bool(ours.valid.all())
    np.testing.assert_allclose(ours.fractions, np.arange(17) / 16, rtol=1e-7)
    for b in range(2):
        scores, auc, c = rise_reference(net, normalised(images[b : b + 1], mean, std), maps[b], game, step)
        assert int(ours.classes[b]) == c
        np.testing.assert_allclose(ours.scores[b], scores, atol=TOL, rtol=0)
        assert abs(float(ours.auc[b]) - auc) <= TOL
    assert np.ptp(np.asarray(ours.scores)) > 0.1  # the curves move: the comparison means something


def test_rise_partial_last_step_and_presets(twin, images, maps):
    model, net, mean, std = twin
    ours = metrics.rise_deletion(model, images[:1], maps[:1], step=100, chunk=None)  # 1024 = 10 * 100 + 24
    scores, auc, _ = rise_reference(net, normalised(images[:1], mean, std), maps[0], "deletion", 100)
    assert ours.scores.shape == (1, 12)
    np.testing.assert_allclose(ours.scores[0], scores, atol=TOL, rtol=0)
    assert metrics.RISE_STEPS == {"single": 224, "batched": 1792}
    # A preset larger than the image is one step: start and fully substituted image.
    assert metrics.rise_deletion(model, images[:1], maps[:1], step="batched").scores.shape == (1, 2)
    with pytest.raises(ValueError, match="preset"):
        metrics.rise_deletion(model, images, maps, step="fast")


def _fraction_model(fill, *, two_class=True):
    """p_0 = 0.1 + 0.8 x (fraction of pixels that differ from `fill`), exactly as a softmax."""

    def forward(x):
        changed = jnp.mean(jnp.any(x != fill, axis=-1).astype(jnp.float32), axis=(1, 2))
        g = 0.1 + 0.8 * changed
        return jnp.stack([jnp.log(g), jnp.log1p(-g)], axis=-1)

    return jax.tree_util.Partial(forward)


def test_rise_deletion_analytic_game():
    # metrics.md §8.2: a model reading the fraction of original pixels gives a straight deletion
    # curve, 0.9 - 0.8 i / n, whose AUC is its mean height 0.5.
    fill = jnp.array([0.25, 0.5, 0.75])
    x = jax.random.uniform(jax.random.key(0), (2, 8, 12, 3), minval=0.3, maxval=0.45)  # never the fill colour
    maps = jax.random.uniform(jax.random.key(1), (2, 8, 12))
    result = metrics.rise_deletion(_fraction_model(fill), x, maps, targets=0, fill=fill, step=8)
    n = 12
    np.testing.assert_allclose(result.scores, np.broadcast_to(0.9 - 0.8 * np.arange(n + 1) / n, (2, n + 1)), atol=1e-6)
    np.testing.assert_allclose(result.auc, [0.5, 0.5], atol=1e-6)
    trapezoid = np.sum((result.scores[:, 1:] + result.scores[:, :-1]) / 2 * np.diff(np.linspace(0, 1, n + 1)), axis=1)
    np.testing.assert_allclose(result.auc, trapezoid, atol=1e-6)


def test_tie_order_is_reversed_stable_argsort():
    # Many ties (a quantised map): the order is np.argsort(kind='stable') reversed, i.e. tied pixels
    # go highest flat index first; I-GOS masks: stable ascending.
    quantised = np.random.RandomState(2).randint(0, 4, size=(3, 6, 7)).astype(np.float32)
    expected = np.flip(np.argsort(quantised.reshape(3, -1), axis=1, kind="stable"), axis=1)
    ranks = np.asarray(descending_ranks(jnp.asarray(quantised))).reshape(3, -1)
    np.testing.assert_array_equal(np.argsort(ranks, axis=1), expected)
    ascending = np.asarray(ascending_ranks(jnp.asarray(quantised))).reshape(3, -1)
    np.testing.assert_array_equal(np.argsort(ascending, axis=1), np.argsort(quantised.reshape(3, -1), axis=1, kind="stable"))
    # A constant map is all ties: defined (bottom-right pixel first), nothing divides by zero.
    flat = np.asarray(descending_ranks(jnp.zeros((1, 2, 3)))).ravel()
    np.testing.assert_array_equal(flat, [5, 4, 3, 2, 1, 0])


# ------------------------------------------------------------------------ I-GOS (metrics.md §2)


def igos_reference(net, x, baseline, mask, c):
    """IGOS_pp's metric loop, with the fixed and the logged (last-chunk bug) scores. The composited
    images are collected and scored in one batch per game."""
    s = mask.shape[0]
    cells = s * s
    step = max(1, cells // 50)
    order = torch.argsort(torch.from_numpy(mask.reshape(-1)), stable=True)
    keep = torch.ones(cells)
    upsample = torch.nn.UpsamplingBilinear2d(size=tuple(x.shape[2:]))
    deleted, inserted, chunks = [x], [baseline], []
    for start in range(0, cells, step):
        keep[order[start : start + step]] = 0
        with torch.no_grad():
            up = upsample(keep.view(1, 1, s, s))
        deleted.append(x * up + baseline * (1 - up))
        inserted.append(baseline * up + x * (1 - up))
        chunks.append((start, min(step, cells - start)))
    curves, fixed, logged = [], [], []
    for images in (deleted, inserted):
        p = probabilities(net, torch.cat(images), c)
        curves.append(p)
        fixed.append(sum(n * p_j for (_, n), p_j in zip(chunks, p[1:])) / cells)
        logged.append(sum(p_j * step if start + step < cells else cells - start for (start, _), p_j in zip(chunks, p[1:])) / cells)
    return curves[0], curves[1], np.array(fixed), np.array(logged)


def test_igos_vs_reference_loop(twin, images):
    model, net, mean, std = twin
    masks = np.random.RandomState(3).rand(2, 28, 28).astype(np.float32)  # s = 28: 53 chunks, 54 points
    blurred = np.stack([scipy_ndimage.uniform_filter(im, size=(9, 9, 1), mode="reflect") for im in images])
    deletion = metrics.igos_deletion(model, images, masks, blurred)  # chunks of 16 points: 3 + a remainder
    insertion = metrics.igos_insertion(model, images, masks, blurred, chunk=None)
    assert deletion.scores.shape == insertion.scores.shape == (2, 54)
    assert float(deletion.fractions[-1]) == 1.0
    np.testing.assert_allclose(np.diff(deletion.fractions)[[0, -1]], [15 / 784, 4 / 784], rtol=1e-5)
    for b in range(2):
        x, base = normalised(images[b : b + 1], mean, std), normalised(blurred[b : b + 1], mean, std)
        c = int(torch.argmax(net(x)))
        ref_del, ref_ins, fixed, logged = igos_reference(net, x, base, masks[b], c)
        for ours, ref, k in ((deletion, ref_del, 0), (insertion, ref_ins, 1)):
            np.testing.assert_allclose(ours.scores[b], ref, atol=TOL, rtol=0)
            assert abs(float(ours.score[b]) - fixed[k]) <= TOL
            assert abs(float(ours.reference_score[b]) - logged[k]) <= TOL
            auc_plot = (ref.sum() - ref[0] / 2 - ref[-1] / 2) / len(ref)
            assert abs(float(ours.auc_plot[b]) - auc_plot) <= TOL
    assert np.ptp(np.asarray(deletion.scores)) > 0.1


def test_igos_hand_computable_example():
    # An 11 x 11 mask on an 11 x 11 image (the align_corners upsampler is then the identity): 121
    # cells, step 121 // 50 = 2, 61 chunks (60 of 2 cells, the last of 1), 62 points. Image 1,
    # baseline 0, and p_0 = 0.1 + 0.8 x (fraction of pixels not 0): after k chunks p = 0.9 - 0.8 c_k / 121.
    fill = jnp.zeros(3)
    image = jnp.ones((1, 11, 11, 3))
    masks = jax.random.uniform(jax.random.key(4), (1, 11, 11))
    result = metrics.igos_deletion(_fraction_model(fill), image, masks, fill, targets=0)
    assert result.scores.shape == (1, 62)
    p = lambda cells: 0.9 - 0.8 * cells / 121
    # Fixed: sum_j n_j p_j / 121 = (2 sum_{k=1..60} p(2k) + 1 p(121)) / 121.
    fixed = (2 * sum(p(2 * k) for k in range(1, 61)) + p(121)) / 121
    assert abs(fixed - 7224.1 / 14641) < 1e-12  # = (2 (54 - 1.6 * 1830 / 121) + 0.1) / 121, by hand
    assert abs(float(result.score[0]) - fixed) < 1e-6
    # IGOS_pp adds the constant 1 instead of 1 * p_61 = 0.1 for the last chunk: + 0.9 / 121.
    assert abs(float(result.reference_score[0]) - (fixed + 0.9 / 121)) < 1e-6
    # The plot AUC divides the trapezoid by the 62 points.
    curve = np.array([p(0)] + [p(2 * k) for k in range(1, 61)] + [p(121)])
    np.testing.assert_allclose(result.scores[0], curve, atol=1e-6)
    assert abs(float(result.auc_plot[0]) - (curve.sum() - curve[0] / 2 - curve[-1] / 2) / 62) < 1e-6


# --------------------------------------------------------------- BEE perturbation (metrics.md §4)

STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def perturbation_reference(net, x, vis, target):
    """BEE's loop: top-k of vis zeroed in all channels of the normalised tensor, k = int(hw s)."""
    hw = x.shape[2] * x.shape[3]
    flat_vis = torch.from_numpy(vis.reshape(-1))
    perturbed = []
    for k in [0] + [int(hw * s) for s in STEPS]:
        _, idx = torch.topk(flat_vis, k)
        image = x.clone().view(3, hw)
        image[:, idx] = 0
        perturbed.append(image.view(1, 3, *x.shape[2:]))
    with torch.no_grad():
        logits = net(torch.cat(perturbed))
    correct = (logits.argmax(1) == target).double().numpy()
    probs = torch.softmax(logits, 1)[:, target].double().numpy()
    x_axis = np.arange(0, 1, 0.1)
    auc = lambda y: sklearn_metrics.auc(x_axis, y) * 100
    return correct, probs, auc(correct), auc(probs)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_perturbation_vs_reference_loop(twin, images, maps, mode):
    model, net, mean, std = twin
    ours = metrics.perturbation_curves(model, images, maps, mode=mode)
    np.testing.assert_allclose(ours.fractions, np.arange(0, 1, 0.1), rtol=1e-7)
    for b in range(2):
        x = normalised(images[b : b + 1], mean, std)
        target = int(torch.argmax(net(x)))  # BEE scores the predicted label
        vis = maps[b] if mode == "positive" else -maps[b]
        correct, probs, acc_auc, prob_auc = perturbation_reference(net, x, vis, target)
        np.testing.assert_array_equal(ours.correct[b], correct)
        np.testing.assert_allclose(ours.probabilities[b], probs, atol=TOL, rtol=0)
        assert abs(float(ours.accuracy_auc[b]) - acc_auc) <= 1e-4  # x 100
        assert abs(float(ours.probability_auc[b]) - prob_auc) <= 1e-3  # x 100 of a 1e-5 bound


def test_confidence_change_vs_reference(twin, images, maps):
    model, net, mean, std = twin
    ours = metrics.confidence_change(model, images, maps)
    for b in range(2):
        x = normalised(images[b : b + 1], mean, std)
        c = int(torch.argmax(net(x)))
        heat = torch.from_numpy(maps[b])
        heat = ((heat - heat.min()) / (heat.max() - heat.min())).view(1, 1, SIZE, SIZE)
        full, on, off = (probability(net, v, c) for v in (x, x * heat, x * (1 - heat)))
        assert abs(float(ours.adp[b]) - 100 * max(0, full - on) / full) <= 1e-3
        assert float(ours.pic[b]) == 100 * float(on > full)
        assert abs(float(ours.add[b]) - 100 * max(0, full - off) / full) <= 1e-3


# ------------------------------------------------------------------------------- bad input


def tiny_forward():
    """A small conv net as a pytree callable: bad-input behaviour needs no ResNet."""
    k1, k2 = jax.random.split(jax.random.key(7))
    params = {"w": jax.random.normal(k1, (3, 3, 3, 8)), "d": jax.random.normal(k2, (8, 5))}

    def forward(p, x):
        h = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).mean(axis=(1, 2)) @ p["d"]

    return jax.tree_util.Partial(forward, params)


def test_bad_maps(twin, images, maps):
    model, fill = tiny_forward(), np.full(3, 0.5, np.float32)
    bad = maps.copy()
    bad[1, 3, 4] = np.nan
    result = metrics.rise_deletion(model, images, bad, fill=fill, step=256)
    assert result.valid.tolist() == [True, False]
    assert np.isfinite(result.scores[0]).all() and np.isnan(result.scores[1]).all() and np.isnan(result.auc[1])
    alone = metrics.rise_deletion(model, images[:1], maps[:1], fill=fill, step=256)
    np.testing.assert_allclose(result.scores[0], alone.scores[0], atol=1e-6)  # the rest go on unchanged
    # A smaller map is resized to the images, with a warning.
    with pytest.warns(UserWarning, match="resizing the maps"):
        small = metrics.perturbation_curves(model, images, maps[:, ::2, ::2], fill=fill)
    assert small.correct.shape == (2, 10)
    # Constant maps: defined, finite results.
    flat = metrics.confidence_change(model, images, np.ones((2, SIZE, SIZE), np.float32), fill=fill)
    assert np.isfinite(np.asarray(flat.adp)).all()
    igos = metrics.igos_deletion(model, images, np.ones((2, 4, 4), np.float32), images * 0.5)
    assert np.isfinite(np.asarray(igos.scores)).all()
    model = twin[0]
    with pytest.raises(ValueError, match=r"\(batch, height, width\)"):
        metrics.rise_deletion(model, images, maps[0])
    with pytest.raises(ValueError, match="2 images"):
        metrics.rise_deletion(model, images, maps[:1])
    with pytest.raises(TypeError, match="fill="):
        metrics.rise_deletion(jax.tree_util.Partial(model.__call__), images, maps)
    with pytest.raises(ValueError, match="chunk"):
        metrics.rise_deletion(model, images, maps, chunk=0)
    with pytest.raises(ValueError, match="baselines"):
        metrics.igos_deletion(model, images, maps, images[:, :8])
    with pytest.raises(ValueError, match="mode"):
        metrics.perturbation_curves(model, images, maps, mode="POS")
    np.testing.assert_array_equal(metrics.mean_colour(model), np.asarray(model.module.mean, np.float32))


# --------------------------------------------------------------- segmentation (metrics.md §5)


def sklearn_scores(saliency, gt):
    """IIA's eval_batch for one image, through sklearn."""
    r = saliency.astype(np.float32)
    span = r.max() - r.min()
    if span > 0:
        r = (r - r.min()) / span
        background = 1 - r
    else:  # the reference's 0/0 NaNs, set to 0 in both channels
        r = background = np.zeros_like(r)
    pred = r > r.mean()
    ap = sklearn_metrics.average_precision_score(
        np.concatenate([(gt == 0).ravel(), (gt == 1).ravel()]), np.concatenate([background.ravel(), r.ravel()])
    )
    f1 = sklearn_metrics.f1_score(gt.ravel(), pred.ravel(), zero_division=0)
    return ap, f1, pred


def test_segmentation_vs_sklearn():
    rng = np.random.RandomState(5)
    maps = rng.rand(5, 12, 10).astype(np.float32)
    maps[1] = np.round(maps[1] * 3)  # many ties: AP over distinct thresholds only
    maps[2] = 0.7  # constant
    masks = rng.rand(5, 12, 10) > 0.6
    masks[3] = False  # no foreground: F1 = 0
    scores = metrics.segmentation_scores(maps, masks)
    for b in range(5):
        ap, f1, pred = sklearn_scores(maps[b], masks[b].astype(int))
        assert abs(float(scores.average_precision[b]) - ap) <= 1e-6, b
        assert abs(float(scores.f1[b]) - f1) <= 1e-6, b
        assert int(scores.correct[b]) == int((pred == masks[b]).sum())
    # Dataset totals: pooled confusion counts over batches of any split equal the direct ones.
    totals = segmentation.init()
    for part in (slice(0, 2), slice(2, 5)):
        totals = segmentation.update(totals, metrics.segmentation_scores(maps[part], masks[part]))
    preds = np.stack([sklearn_scores(m, g.astype(int))[2] for m, g in zip(maps, masks)])
    inter = [((preds == c) & (masks == c)).sum() for c in (0, 1)]
    union = [((preds == c) | (masks == c)).sum() for c in (0, 1)]
    result = segmentation.result(totals)
    assert result["images"] == 5 and result["skipped"] == 0
    np.testing.assert_allclose(result["pixel_accuracy"], (preds == masks).mean(), rtol=1e-12)
    np.testing.assert_allclose(result["miou"], np.mean(np.divide(inter, union)), rtol=1e-12)
    np.testing.assert_allclose(result["map"], np.mean(np.asarray(scores.average_precision, np.float64)), rtol=1e-12)


def test_segmentation_hand_counted():
    # Image 1: the map's 5 hot pixels (R > mean 5/16) against a 4-pixel mask; 3 overlap.
    #   foreground: intersection 3, union 5 + 4 - 3 = 6; background: 10 and 11 + 12 - 10 = 13;
    #   correct 13 of 16; F1 = 2 * 3 / (2 * 3 + 2 + 1) = 2/3.
    # Image 2: values 0..15 (R > 0.5: the bottom two rows) against the left two columns.
    #   foreground 4 / 12, background 4 / 12, correct 8; F1 = 8 / 16.
    map1 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], np.float32)
    gt1 = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    map2 = np.arange(16, dtype=np.float32).reshape(4, 4)
    gt2 = np.tile([1, 1, 0, 0], (4, 1))
    scores = metrics.segmentation_scores(np.stack([map1, map2]), np.stack([gt1, gt2]))
    assert scores.intersection.tolist() == [[10, 3], [4, 4]]
    assert scores.union.tolist() == [[13, 6], [12, 12]]
    assert scores.correct.tolist() == [13, 8]
    np.testing.assert_allclose(scores.f1, [2 / 3, 0.5], rtol=1e-6)
    result = segmentation.result(segmentation.update(segmentation.init(), scores))
    assert abs(result["pixel_accuracy"] - 21 / 32) < 1e-12
    assert abs(result["iou_background"] - 14 / 25) < 1e-12 and abs(result["iou_foreground"] - 7 / 18) < 1e-12
    assert abs(result["miou"] - (14 / 25 + 7 / 18) / 2) < 1e-12
    assert abs(result["mf1"] - (2 / 3 + 0.5) / 2) < 1e-6


def test_segmentation_bad_input():
    maps = np.random.RandomState(6).rand(3, 8, 8).astype(np.float32)
    masks = np.zeros((3, 8, 8), bool)
    masks[:, 2:5, 3:6] = True
    maps[1, 0, 0] = np.inf
    scores = metrics.segmentation_scores(maps, masks)
    assert scores.valid.tolist() == [True, False, True]
    totals = segmentation.update(segmentation.init(), scores, rows=[True, True, False])  # row 3: padding
    assert (totals.images, totals.skipped) == (1, 1)
    with pytest.warns(UserWarning, match="resizing the maps"):
        metrics.segmentation_scores(maps[:, ::2, ::2], masks)
    with pytest.raises(ValueError, match="binary"):
        metrics.segmentation_scores(maps, masks * 2)
    # Mask files: 0 and one foreground value, the image's size; or an explicit threshold.
    np.testing.assert_array_equal(metrics.binary_mask(np.array([[0, 255], [255, 0]], np.uint8)), [[False, True], [True, False]])
    with pytest.raises(ValueError, match="values 0, 1, 255"):
        metrics.binary_mask(np.array([[0, 1], [255, 0]]))
    np.testing.assert_array_equal(metrics.binary_mask(np.array([[0, 1], [255, 0]]), threshold=0), [[False, True], [True, False]])
    with pytest.raises(ValueError, match="mask is 2x2 but its image is 3x3"):
        metrics.binary_mask(np.zeros((2, 2)), (3, 3))
    with pytest.raises(ValueError, match="colour mask"):
        metrics.binary_mask(np.stack([np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2))], -1))
    assert metrics.binary_mask(np.full((2, 2, 3), 7)).all()
    assert np.isnan(segmentation.result(segmentation.init())["map"])


# ------------------------------------------------------------- chunks and devices change nothing

DEVICES_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jaxattr import metrics

    assert len(jax.devices()) == 4, jax.devices()
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    def forward(p, x):
        h = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return 4 * jax.nn.relu(h).mean(axis=(1, 2)) @ p["d"]
    model = jax.tree_util.Partial(forward, {"w": jax.random.normal(k1, (3, 3, 3, 8)), "d": jax.random.normal(k2, (8, 5))})
    x = jax.random.uniform(k3, (3, 16, 16, 3))  # 3 images on 4 devices: one padded row
    maps = jax.random.uniform(k4, (3, 16, 16)).at[2, 0, 0].set(jnp.nan)  # and one invalid row
    masks, fill = maps[:, ::4, ::4], jnp.array([0.4, 0.5, 0.6])
    runs = {
        "rise_insertion": lambda **o: metrics.rise_insertion(model, x, maps, jnp.array([0, 3, 1]), fill=fill, step=16, **o),
        "igos_deletion": lambda **o: metrics.igos_deletion(model, x, masks, x[::-1] * 0.5, **o),
        "igos_insertion": lambda **o: metrics.igos_insertion(model, x, masks, fill, **o),
        "perturbation": lambda **o: metrics.perturbation_curves(model, x, maps, fill=fill, mode="negative", **o),
        "confidence": lambda **o: metrics.confidence_change(model, x, maps, fill=fill, devices=o.get("devices")),
    }
    report = {}  # every run: one chunk of all points (chunk=None) vs chunks of 3 points, then also split over devices
    for name, run in runs.items():
        reference = run(chunk=None)
        leaves = lambda r: [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(r)]
        diffs = {}
        for label, options in {"chunk": dict(chunk=3), "devices": dict(devices=jax.devices(), chunk=3)}.items():
            other = run(**options)
            diffs[label] = max(float(np.nanmax(np.abs(a - b), initial=0)) for a, b in zip(leaves(reference), leaves(other)))
            diffs[label + "_nan_same"] = all(bool((np.isnan(a) == np.isnan(b)).all()) for a, b in zip(leaves(reference), leaves(other)))
        diffs["valid"] = np.asarray(reference.valid).tolist()
        report[name] = diffs
    print("REPORT" + json.dumps(report))
    """
)


def test_chunks_and_devices_change_nothing():
    report = json.loads(report_on_four_devices(DEVICES_SCRIPT, timeout=600))
    assert set(report) == {"rise_insertion", "igos_deletion", "igos_insertion", "perturbation", "confidence"}
    for name, diffs in report.items():
        assert diffs.pop("valid") == [True, True, False], name
        for label, value in diffs.items():
            if label.endswith("nan_same"):
                assert value, (name, label)
            else:  # equal up to XLA choosing other kernels for other batch sizes
                assert value <= 1e-6, (name, label, value)
