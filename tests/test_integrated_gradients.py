"""Integrated Gradients and GNL-IG against captum and PAIR saliency on a random ResNet-18 twin.

Both sides explain pixel inputs (the torch twin wrapped in PixelInput) with per-image targets;
every reference runs in the same test through the runners that `jaxattr crosscheck` uses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import explain, paths
from jaxattr.methods import path_scores, straight_image_path
from jaxattr.methods.baselines import baseline_images
from jaxattr.methods.integrated_gradients import GnlIGConfig, IntegratedGradientsConfig, gnl_ig, integrated_gradients

torch = pytest.importorskip("torch")
pytest.importorskip("captum")
pytest.importorskip("saliency")

from captum.attr import IntegratedGradients  # noqa: E402

from converters import crosscheck  # noqa: E402
from converters.references import gradients as gradient_refs  # noqa: E402
from converters.references import integrated_gradients as refs  # noqa: E402
from converters.torch_models import to_numpy_nhwc, to_torch_images, torch_twin  # noqa: E402

TARGETS = np.array([3, 7])  # a different class per image
RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(2, 32, 32, 3)


@pytest.fixture(scope="module", params=["float32", "float64"])
def twin(request):
    """(dtype, jaxattr model, torch model): a fresh twin per dtype, so float64 runs never see
    constants that went through float32."""
    torch_model, model = torch_twin("resnet18")
    return request.param, model, torch_model


def _check(method, twin, images, targets=TARGETS, **options):
    dtype, model, torch_model = twin
    result = crosscheck.run(method, model, torch_model, images, targets, dtype=dtype, **options)
    assert result.ok, result
    return result


@pytest.mark.parametrize("rule", RULES)
def test_integrated_gradients_vs_captum(twin, images, rule):
    # float64 from a random baseline: rules that evaluate a constant baseline tie every max-pool
    # window exactly, and in float64 the CPU's convolution rounding then decides which entry takes the
    # gradient (see converters.references.integrated_gradients). float32 from captum's black default:
    # there the same ties resolve alike, while random float32 path points put many units near their
    # kinks (measured: 6.6 % of entries beyond 1e-5 on an AMD EPYC).
    dtype = twin[0]
    baseline = "uniform" if dtype == "float64" else "black"
    config = IntegratedGradientsConfig(steps=16, rule=rule, baseline=baseline)
    _check("integrated_gradients", twin, images, config=config, key=jax.random.key(0))


def test_captum_defaults(images):
    # float64: the first Gauss-Legendre node of 50 (t = 5.7e-4) is an almost constant image, where
    # the random ResNet's max-pools see near-ties that float32 rounding resolves differently in
    # torch and XLA (1 % gradient differences at that node, 9e-5 in the attributions).
    torch_model, model = torch_twin("resnet18")
    _check("integrated_gradients", ("float64", model, torch_model), images, targets=None)  # predicted classes


def test_chunks_mean_baseline_vs_captum_internal_batching(twin, images):
    config = IntegratedGradientsConfig(steps=10, baseline="mean", chunk=3)
    _check("integrated_gradients", twin, images, config=config)


def test_probability_output_uniform_baseline_vs_captum(twin, images):
    config = IntegratedGradientsConfig(steps=8, rule="riemann_middle", baseline="uniform", output="probability")
    _check("integrated_gradients", twin, images, config=config, key=jax.random.key(3))


def test_blur_baseline_vs_captum(images):
    # float64 only: along this path float32 rounding can flip ReLUs of the random net at a few
    # points (seen with an earlier blur: plain gradients there differed by ~1 %, the IG by 3e-3).
    torch_model, model = torch_twin("resnet18")
    config = IntegratedGradientsConfig(steps=8, baseline="blur", blur_sigma=3.0)
    _check("integrated_gradients", ("float64", model, torch_model), images, config=config)


@pytest.mark.parametrize("baseline", ["mean", "black"])
def test_float32_path_points_are_the_normalised_space_points(images, baseline):
    """With a jaxattr Model the path is built in the model's normalised space, as captum builds it on
    normalised inputs: every float32 point is the float64 pipeline's to float32 rounding (a path
    built in pixels and normalised inside the model is off by ~eps·|mean| / |t (x - mean)| near a
    'mean' baseline: 4.4e-5 of the point at the first of 50 Gauss-Legendre nodes)."""
    _, model = torch_twin("resnet18")
    nodes = paths.quadrature("gausslegendre", 50).nodes

    def points(x):
        starts = baseline_images(baseline, model, x)
        _, path = straight_image_path(model, starts, x, jnp.asarray(TARGETS))
        return np.asarray(path.points(jnp.asarray(nodes, x.dtype)), np.float64), np.asarray(path.tangents(), np.float64)

    x = images.astype(np.float32)
    ours, tangent = points(jnp.asarray(x))
    with jax.enable_x64(True):
        exact, exact_tangent = points(jnp.asarray(x, np.float64))
    per_node = np.abs(ours - exact).reshape(len(nodes), -1).max(1) / np.abs(exact).reshape(len(nodes), -1).max(1)
    assert per_node.max() <= 4 * np.finfo(np.float32).eps
    assert crosscheck.max_rel_diff(tangent, exact_tangent) <= 2 * np.finfo(np.float32).eps


def test_user_baselines(images):
    torch_model, model = torch_twin("resnet18")
    baselines = np.random.RandomState(1).rand(*images.shape).astype(np.float32)
    x = images.astype(np.float32)
    ours = integrated_gradients(model, x, TARGETS, config=IntegratedGradientsConfig(steps=8), baselines=baselines)
    theirs = IntegratedGradients(torch_model).attribute(
        to_torch_images(x), baselines=to_torch_images(baselines), target=torch.from_numpy(TARGETS), n_steps=8
    )
    assert crosscheck.max_rel_diff(ours, to_numpy_nhwc(theirs)) <= 1e-5
    with pytest.raises(ValueError, match="do not broadcast"):
        integrated_gradients(model, x, TARGETS, baselines=baselines[:, :16])


def test_pair_integrated_gradients_vs_saliency(twin, images):
    dtype, model, torch_model = twin
    with crosscheck.precision(dtype) as np_dtype:
        m, x = model.astype(np_dtype), images.astype(np_dtype)
        t = torch_model.to(torch.float64 if dtype == "float64" else torch.float32)
        baselines = np.random.RandomState(1).rand(*x.shape).astype(np_dtype)  # not a constant image: no exact ties
        # PAIR's arithmetic calls the model on pixel points, which jaxattr does for a plain forward;
        # a Model's path lies in its normalised space (straight_image_path).
        pixel_forward = jax.tree_util.Partial(lambda model, images: model(images), m)
        for batch_size in (1, 3):  # 3 does not divide the 10 steps: a smaller last batch, as in PAIR
            run = functools.partial(
                refs.integrated_gradients_vs_pair,
                torch_model=t, images=x, targets=TARGETS, steps=10, batch_size=batch_size, baselines=baselines,
            )
            ours, theirs = run(m)
            if dtype == "float64":
                # Per-batch sums into a float32 buffer, then x (x - x') / n: bit for bit in pixels;
                # the buffer of normalised-space gradients rounds differently (float32 ulps).
                np.testing.assert_array_equal(run(pixel_forward)[0], theirs)
                assert crosscheck.max_rel_diff(ours, theirs) <= 1e-6
            else:
                assert crosscheck.max_rel_diff(ours, theirs) <= 1e-5


def test_pair_rule_is_captum_trapezoid_plus_end_point_correction(images):
    """saliency(n) = captum_trapezoid(n) + (g(0) + g(1)) / (2n) (x - x'), for the references and for jaxattr.

    Up to the anchors' float32 steps (PAIR's float32 buffer, captum's float32 nodes and weights):
    ~1e-6 of the correction term (metrics.md §6: verified to 8e-6)."""
    torch_model, model = torch_twin("resnet18")
    n = 10
    with jax.enable_x64(True):
        m, t, x = model.astype(np.float64), torch_model.double(), images
        ours_pair, pair = refs.integrated_gradients_vs_pair(m, t, x, TARGETS, steps=n)
        config = IntegratedGradientsConfig(steps=n, rule="riemann_trapezoid")
        ours_trapezoid, trapezoid = refs.integrated_gradients_vs_captum(m, t, x, TARGETS, config=config)
        ours_ends = [gradient_refs.saliency_vs_captum(m, t, end, TARGETS) for end in (np.zeros_like(x), x)]
    correction = (ours_ends[0][1] + ours_ends[1][1]) / (2 * n) * x
    scale = np.abs(correction).max()
    assert np.abs(pair - trapezoid - correction).max() <= 1e-5 * scale
    ours_correction = (ours_ends[0][0] + ours_ends[1][0]) / (2 * n) * x
    assert np.abs(ours_pair - ours_trapezoid - ours_correction).max() <= 1e-5 * scale


def test_completeness_delta_equals_captums(images):
    torch_model, model = torch_twin("resnet18")
    with jax.enable_x64(True):
        m, t = model.astype(np.float64), torch_model.double()
        config = IntegratedGradientsConfig(steps=20, baseline="mean")
        ours = integrated_gradients(m, images, TARGETS, config=config)
        baselines = baseline_images("mean", m, jnp.asarray(images))
        delta = paths.completeness_delta(path_scores(m, jnp.asarray(TARGETS)), ours, baselines, jnp.asarray(images))
        _, captum_delta = IntegratedGradients(t).attribute(
            to_torch_images(images),
            baselines=t.normalisation(torch.float64)[0].expand(len(images), 3, *images.shape[1:3]),
            target=torch.from_numpy(TARGETS),
            n_steps=20,
            return_convergence_delta=True,
        )
    np.testing.assert_allclose(np.asarray(delta), captum_delta.numpy(), rtol=1e-9, atol=1e-12)


def test_gnl_ig_vs_captum_with_guided_rules(twin, images):
    _check("gnl_ig", twin, images)  # GNL's settings: 50 Gauss-Legendre steps, zero normalised baseline


def test_gausslegendre64_matches_captum_020_gnl_in_float64(images):
    """captum 0.2.0, GNL's pin, kept float64 Gauss-Legendre weights: with 'gausslegendre64' GNL-IG
    matches that arithmetic (an independent float64 torch computation from captum 0.2.0's source)
    to float64 rounding; the default rule's float32 weights (modern captum) are ~1e-9 away."""
    torch_model, model = torch_twin("resnet18")
    with crosscheck.precision("float64"):
        m, t = model.astype(np.float64), torch_model.double()
        ours, reference = refs.gnl_ig_vs_captum(m, t, images, TARGETS, config=GnlIGConfig(rule="gausslegendre64"))
        rounded = gnl_ig(m, images, TARGETS, config=GnlIGConfig())
    assert crosscheck.max_rel_diff(ours, reference) <= 4e-15
    assert crosscheck.max_rel_diff(rounded, reference) > 1e-10


def test_gnl_ig_vs_captum_on_vgg11(images):
    # VGG: non-overlapping max-pools and guided ReLUs in the classifier too (gnl.md §2.4).
    torch_model, model = torch_twin("vgg11")
    _check("gnl_ig", ("float64", model, torch_model), images, config=GnlIGConfig(steps=16))


def test_gnl_ig_defaults_and_heatmap(images):
    torch_model, model = torch_twin("resnet18")
    config = GnlIGConfig()
    assert (config.steps, config.rule, config.baseline, config.output) == (50, "gausslegendre", "mean", "logit")
    x = images.astype(np.float32)
    result = explain(model, x, "gnl_ig", steps=8)
    h = np.asarray(result.maps)
    # GNL's map, unclipped: |sum_c a| (GNL divides it by its maximum, a display choice).
    np.testing.assert_allclose(h, np.abs(np.asarray(result.attributions).sum(-1)), rtol=0, atol=1e-6 * h.max())
    # Guided gradients differ from plain ones: GNL-IG is not IG.
    assert crosscheck.max_rel_diff(result.attributions, integrated_gradients(model, x, result.targets, config=IntegratedGradientsConfig(steps=8, baseline="mean"))) > 1e-2


def test_gnl_ig_needs_a_model(images):
    _, model = torch_twin("resnet18")
    with pytest.raises(TypeError, match="pass a jaxattr Model"):
        gnl_ig(lambda x: model(x), images.astype(np.float32))


def test_explain_integrated_gradients(images):
    _, model = torch_twin("resnet18")
    x = images.astype(np.float32)
    result = explain(model, x, "integrated_gradients", steps=4, chunk=2)
    assert result.attributions.shape == (2, 32, 32, 3) and result.maps.shape == (2, 32, 32)
    # A baseline array reaches the method: a white baseline is not the config's black one.
    white = explain(model, x, "integrated_gradients", targets=TARGETS, steps=4, baselines=np.ones_like(x))
    direct = integrated_gradients(model, x, TARGETS, config=IntegratedGradientsConfig(steps=4), baselines=1.0)
    np.testing.assert_allclose(white.attributions, direct, rtol=1e-6, atol=1e-9)
    black = explain(model, x, "integrated_gradients", targets=TARGETS, steps=4)
    assert not np.allclose(white.attributions, black.attributions)
    with pytest.raises(ValueError, match="saliency takes no baselines"):
        explain(model, x, "saliency", baselines=np.ones_like(x))


def test_config_errors_name_the_choices():
    with pytest.raises(ValueError, match="expected one of .*riemann_trapezoid.*pair"):
        IntegratedGradientsConfig(rule="trapezoid")
    with pytest.raises(ValueError, match="expected one of .*black.*uniform"):
        IntegratedGradientsConfig(baseline="zeros")
    with pytest.raises(ValueError, match="chunk"):
        IntegratedGradientsConfig(chunk=0)
    with pytest.raises(ValueError, match="steps >= 2"):
        IntegratedGradientsConfig(rule="riemann_right", steps=1)
    with pytest.raises(ValueError, match="output"):
        IntegratedGradientsConfig(output="softmax")
