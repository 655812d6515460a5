"""I-GOS, iGOS+ and iGOS++ (igos.md §15): building blocks against torch and NumPy, the path-score
gradient against its closed form, the line search on hand-computable cases (and the torch >= 2
crash case), iGOS++'s bookkeeping, trivial limits, the noise contract, batching, bad input, and
parity with the PyTorch reference of `converters/references/igos.py` on a random ResNet-18.

Most tests run a toy classifier (one convolution, tanh, a linear head) on 16 px images with 5 x 5
masks, sharing one compiled program per variant (traced hyper-parameters, weights and targets vary
without recompiling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxattr import ConfigError, explain
from jaxattr.methods import igos as igos_module
from jaxattr.methods.igos import (
    IGOSConfig,
    IGOSPlusConfig,
    MaskPair,
    Problem,
    RULES,
    abs_sign,
    bilateral_total_variation,
    edge_weights,
    gaussian_noise,
    igos_baselines,
    igos_masks,
    igos_optimizer,
    l1_distance,
    scale_by_projected_backtracking,
    total_variation,
    upsample,
    zero_noise,
)
from jaxattr.models import Model
from jaxattr.models._classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from jaxattr.nn import Conv2d, Linear

torch = pytest.importorskip("torch")

from converters import crosscheck  # noqa: E402
from converters.references import igos as reference  # noqa: E402
from converters.torch_models import PixelInput, from_torch, torch_model  # noqa: E402

SIZE, CELLS, STEPS, ITERATIONS = 16, 5, 3, 2  # 5 cells do not divide 16 pixels: allowed


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The reference runs one small batch after another: one thread avoids OpenMP's spin-waits,
    which make it 10-20x slower on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
CONFIGS = {
    "igos": IGOSConfig(iterations=ITERATIONS, steps=STEPS, mask_size=CELLS),
    "igos_plus": IGOSPlusConfig(iterations=ITERATIONS, steps=STEPS, mask_size=CELLS),
    "igos_pp": IGOSPlusConfig(iterations=ITERATIONS, steps=STEPS, mask_size=CELLS),
}


class Toy(Classifier):
    """conv 3x3 -> tanh -> 2x2 average pool -> linear: smooth, position-aware, cheap to compile."""

    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def stages(self):
        return [
            ("conv", lambda x: Conv2d(4, 3, 1, 1, name="conv")(x)),
            ("act", jnp.tanh),
            ("pool", lambda x: nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)),
            ("fc", lambda x: Linear(10, name="fc")(x)),
        ]


def toy_model(logit_scale: float = 1.0) -> Model:
    """`logit_scale` multiplies the head (large: a saturated softmax); same program for any weights."""
    module = Toy()
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    params = jax.tree_util.tree_map(lambda p: p * 3, params)  # livelier gradients than lecun_normal
    params["fc"] = jax.tree_util.tree_map(lambda p: p * logit_scale, params["fc"])
    return Model(module, params, "toy")


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.RandomState(0).rand(8, SIZE, SIZE, 3).astype(np.float32))


def run(model, images, variant, key=jax.random.key(0), **changes):
    """igos_masks with the shared small config (changes to traced fields reuse the program)."""
    config = CONFIGS[variant].replace(**changes) if changes else CONFIGS[variant]
    return igos_masks(model, images, variant=variant, config=config, key=key)


# ------------------------------------------------------------------------------ building blocks


def test_upsampler_matches_torch_values_and_vjps(rng):
    F = torch.nn.functional
    for cells, size in [(4, 16), (7, 32), (28, 224)]:
        masks = rng.rand(3, cells, cells).astype(np.float32)
        cotangent = rng.randn(3, size, size).astype(np.float32)
        ours, vjp = jax.vjp(lambda m: upsample(m, (size, size)), jnp.asarray(masks))
        (ours_grad,) = vjp(jnp.asarray(cotangent))
        t = torch.from_numpy(masks)[:, None].requires_grad_()
        theirs = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=True)
        (theirs_grad,) = torch.autograd.grad((theirs[:, 0] * torch.from_numpy(cotangent)).sum(), [t])
        np.testing.assert_allclose(np.asarray(ours), theirs[:, 0].detach().numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours_grad), theirs_grad[:, 0].numpy(), rtol=0, atol=1e-6 * size)


def _interpolation_matrix(cells: int, size: int) -> np.ndarray:
    """A of §4 from its definition: row y samples r = y (s - 1) / (S - 1) (float32 scale)."""
    a = np.zeros((size, cells), np.float32)
    scale = np.float32((cells - 1) / (size - 1))
    for y in range(size):
        r = np.float32(y) * scale
        i0 = int(np.floor(r))
        i1 = min(i0 + 1, cells - 1)
        a[y, i0] += 1 - (r - i0)
        a[y, i1] += r - i0
    return a


def _numpy_btv(mask, image, sigma, size):
    """§5 by loops over pixels, float64; image (S, S, 3) normalised."""
    s = mask.shape[0]
    a = _interpolation_matrix(s, size).astype(np.float64)
    up = a @ mask @ a.T
    tv = sum((mask[i, j] - mask[i + 1, j]) ** 2 for i in range(s - 1) for j in range(s)) / ((s - 1) * s)
    tv += sum((mask[i, j] - mask[i, j + 1]) ** 2 for i in range(s) for j in range(s - 1)) / (s * (s - 1))
    vertical = horizontal = 0.0
    for y in range(size):
        for x in range(size):
            if y + 1 < size:  # channels averaged, then squared
                w = np.exp(-np.mean(image[y, x] - image[y + 1, x]) ** 2 / sigma)
                vertical += w * (up[y, x] - up[y + 1, x]) ** 2
            if x + 1 < size:  # each channel exponentiated, then averaged
                w = np.mean(np.exp(-((image[y, x] - image[y, x + 1]) ** 2) / sigma))
                horizontal += w * (up[y, x] - up[y, x + 1]) ** 2
    n = (size - 1) * size
    return tv, 0.5 * (tv + vertical / n + horizontal / n)


def test_regularisers_match_a_numpy_evaluation(rng):
    mask = rng.rand(5, 5)
    mask[1, 2] = 1.0
    # A smooth image with one sharp edge: weights near 1 in flat regions, ~0 across the edge.
    image = np.cumsum(rng.randn(12, 12, 3) * 0.02, axis=1)
    image[:, 6:] += np.array([0.5, -0.4, 0.3])
    tv, btv = _numpy_btv(mask, image, 0.01, 12)
    with jax.enable_x64(True):
        m, x = jnp.asarray(mask), jnp.asarray(image)
        assert abs(float(l1_distance(m)) - np.mean(np.abs(1 - mask))) < 1e-15
        assert abs(float(total_variation(m)) - tv) < 1e-15
        ours = float(bilateral_total_variation(m, edge_weights(x, jnp.float64(0.01))))
    assert abs(ours - btv) < 1e-6 * btv  # float32 sampling positions in the NumPy evaluation
    # The asymmetry matters: averaging the channels before squaring horizontally changes BTV.
    weights = edge_weights(jnp.asarray(image, jnp.float32), jnp.float32(0.01))
    symmetric = np.exp(-np.mean(image[:, :-1] - image[:, 1:], axis=-1) ** 2 / 0.01)
    assert np.abs(np.asarray(weights.horizontal) - symmetric).max() > 0.1


def test_l1_gradient_is_zero_at_one_where_jnp_abs_is_not():
    ones = jnp.ones((4, 4))
    np.testing.assert_array_equal(np.asarray(jax.grad(l1_distance)(ones)), 0.0)
    assert float(jax.grad(lambda x: abs_sign(x))(0.0)) == 0.0
    assert float(jax.grad(lambda m: jnp.mean(jnp.abs(1 - m)))(ones)[0, 0]) == -1 / 16  # the trap


def test_baseline_is_the_reflect_101_gaussian_in_8_bit_levels(rng):
    images = rng.randint(0, 256, (2, 40, 40, 3)).astype(np.float32) / 255
    ours = np.asarray(igos_baselines(jnp.asarray(images), kernel=9))
    # OpenCV's kernel: exp(-x^2 / (2 sigma^2)), sigma = k - 1, normalised; border reflect-101
    # (NumPy's 'reflect'); then rounded to 8 bits.
    x = np.arange(-4, 5)
    kernel = np.exp(-(x**2) / (2 * 8.0**2))
    kernel /= kernel.sum()
    padded = np.pad(images.astype(np.float64), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    rows = sum(k * padded[:, i : i + 40] for i, k in enumerate(kernel))
    blurred = sum(k * rows[:, :, i : i + 40] for i, k in enumerate(kernel))
    expected = np.round(blurred * 255) / 255
    assert np.mean(ours != expected.astype(np.float32)) < 0.01  # exact but for rounding ties
    np.testing.assert_allclose(ours, expected, atol=1 / 255 + 1e-7)
    assert igos_module.blur_kernel_size(224) == 51 and igos_module.blur_kernel_size(600) == 151
    assert igos_module.blur_kernel_size(1024) == 201


# ------------------------------------------------------------------------------- path gradient


def _problem(model, images, variant, key=jax.random.key(0), noise=gaussian_noise, **changes):
    config = CONFIGS[variant].replace(**changes) if changes else CONFIGS[variant]
    x = model.normalise(images[:1])[0]
    b = model.normalise(igos_baselines(images[:1]))[0]
    target = jnp.argmax(model(images[:1])[0])
    return Problem(RULES[variant], model.from_normalised, x, b, target, config, key, noise)


def test_path_gradient_equals_its_closed_form(model, images):
    problem = _problem(model, images, "igos", noise=zero_noise, l1=0.0, l2=0.0)
    mask = jnp.asarray(np.random.RandomState(1).rand(CELLS, CELLS).astype(np.float32))
    ours = jax.jit(problem.direction)(mask, jnp.int32(0))
    # A^T [ (1/N) sum_k t_k sum_ch (I - B) dp_c/dx |_{x_k} ] A, dp_c/dx by jax.grad of p_c alone.
    a = _interpolation_matrix(CELLS, SIZE)
    up = a @ np.asarray(mask) @ a.T
    p_c = lambda x: jax.nn.softmax(model.from_normalised(x[None])[0])[problem.target]
    inner = np.zeros((SIZE, SIZE))
    for t in np.linspace(1 / STEPS, 1, STEPS, dtype=np.float32):
        u = (up * t)[..., None]
        x = problem.image * u + problem.baseline * (1 - u)
        inner += t * np.sum((problem.image - problem.baseline) * jax.jit(jax.grad(p_c))(x), axis=-1) / STEPS
    np.testing.assert_allclose(np.asarray(ours), a.T @ inner @ a, rtol=2e-5, atol=1e-9)
    assert np.abs(np.asarray(ours)).max() > 1e-5  # a real gradient


# -------------------------------------------------------------------------------- line search


def _search(value_fn, params, grad, **options):
    """One line search: (step, trials, new params) of the chain -grad -> backtracking."""
    chain = igos_module.optax.chain(igos_module.optax.scale(-1.0), scale_by_projected_backtracking(1000.0, **options))
    state = chain.init(params)
    updates, state = chain.update(grad, state, params, value=value_fn(params, 0), grad=grad, value_fn=value_fn)
    return state[1].step_size, state[1].trials, igos_module.project_box(params + updates, 0.0, 1.0)


def _quadratic(centre):
    return lambda m, trial=0: 0.5 * jnp.sum((m - centre) ** 2)


def test_line_search_never_satisfied_ends_on_the_last_ladder_step():
    params = jnp.full((2, 2), 0.5, jnp.float32)
    step, trials, _ = _search(lambda m, trial: jnp.float32(1.0) + trial, params, jnp.full((2, 2), 0.1, jnp.float32))
    assert step.dtype == jnp.float32 and int(trials) == 13
    assert float(step) == 4.0960007936519105e-06  # the float32 ladder value (igos.md §8)


def test_line_search_on_a_quadratic_accepts_the_first_passing_ladder_step():
    # f = 1/2 |m - 0.4|^2 at m = 0.5, g = 0.1: alpha = 1000, 200, 40, 8 clip m to 0 (f grows);
    # alpha = 1.6 gives m = 0.34, f = 0.0018 * 4 cells <= f0 - 1e-4 * 1.6 * |g|^2: accepted, 5 trials.
    params = jnp.full((2, 2), 0.5, jnp.float32)
    f = _quadratic(0.4)
    step, trials, new = _search(f, params, jax.grad(f)(params))
    assert float(step) == 1.600000023841858 and int(trials) == 5
    np.testing.assert_allclose(np.asarray(new), 0.34, rtol=1e-6)


def test_per_image_steps_in_a_batch_equal_each_image_alone_and_the_torch_reference():
    # Image 0 accepts alpha0 at once, image 1 never (the torch >= 2 crash case: in the reference
    # every active image passing at once raises), image 2 on the fifth trial.
    params = jnp.full((3, 2, 2), 0.5, jnp.float32)
    centres = jnp.array([0.0, 0.4, 0.4], jnp.float32)[:, None, None]
    offsets = jnp.array([0.0, 1.0, 0.0], jnp.float32)  # image 1's value jumps at every trial

    def value_fn(m, trial, c, offset):
        return _quadratic(c)(m) + offset * jnp.minimum(trial, 1)

    grads = params - centres  # the quadratics' gradients
    batched = jax.vmap(lambda m, g, c, o: _search(lambda p, t: value_fn(p, t, c, o), m, g)[:2])
    steps, trials = batched(params, grads, centres, offsets)
    alone = [_search(lambda p, t, i=i: value_fn(p, t, centres[i], offsets[i]), params[i], grads[i])[:2] for i in range(3)]
    np.testing.assert_array_equal(np.asarray(steps), [float(s) for s, _ in alone])
    np.testing.assert_array_equal(np.asarray(trials), [int(t) for _, t in alone])
    assert np.asarray(steps).tolist() == [1000.0, 4.0960007936519105e-06, 1.600000023841858]
    # The torch reference's line search (torch 1.7.1 semantics) on the same batch.
    t_params, t_grads = torch.from_numpy(np.asarray(params)), torch.from_numpy(np.asarray(grads))
    calls = []

    def loss(m, active):
        calls.append(int(active.sum()))
        rows = torch.nonzero(active)[:, 0].numpy()
        trial = min(len(calls) - 1, 1)
        return torch.tensor([float(value_fn(jnp.asarray(m[j].numpy()), trial, centres[r], offsets[r])) for j, r in enumerate(rows)])

    alphas = reference.line_search(t_params, t_grads, loss, 1000.0, 1e-4, 0.2, 1e-5)
    np.testing.assert_array_equal(alphas.numpy(), np.asarray(steps))
    assert calls[:3] == [3, 3, 2]  # the base, then trials of the still-active images only


# ------------------------------------------------------------------------------ the variants


def test_igos_pp_direction_halves_the_path_gradients_but_its_objective_does_not(model, images):
    problem = _problem(model, images, "igos_pp")
    rng = np.random.RandomState(2)
    masks = MaskPair(*(jnp.asarray(rng.uniform(0.3, 1, (CELLS, CELLS)).astype(np.float32)) for _ in range(2)))
    t = jnp.int32(1)
    nodes = jnp.asarray(np.linspace(1 / STEPS, 1, STEPS), jnp.float32)

    def path_score(shown, hidden, up, slot):  # P(X, Y, U) of §4 with the problem's noise draw
        eps = gaussian_noise(problem.key, t, jnp.int32(slot), (STEPS, SIZE, SIZE, 3), jnp.float32)
        u = up[None, ..., None] * nodes[:, None, None, None]
        x = shown * u + hidden * (1 - u) + eps * 0.2
        return jnp.sum(jax.nn.softmax(model.from_normalised(x))[:, problem.target] / STEPS)

    image, base = problem.image, problem.baseline
    up = lambda m: upsample(m, (SIZE, SIZE))
    D = lambda u, slot: path_score(image, base, u, slot)
    J = lambda u, slot: path_score(base, image, u, slot)

    @jax.jit
    def independent(masks):
        g1 = jax.grad(lambda m: D(up(m.deletion) * up(m.insertion), 0))(masks)
        g2 = jax.grad(lambda m: J(up(m.deletion) * up(m.insertion), 1))(masks)
        g3d = jax.grad(lambda d: D(up(d), 2))(masks.deletion)
        g4i = jax.grad(lambda i: J(up(i), 3))(masks.insertion)
        reg = jax.grad(problem.regulariser)(masks)
        halved = MaskPair(((g1.deletion - g2.deletion) + g3d) / 2 + reg.deletion,
                          ((g1.insertion - g2.insertion) - g4i) / 2 + reg.insertion)
        # The objective of evaluation 0 (draws 4..7): the four terms, no 1/2, and the regulariser.
        ud, ui = up(masks.deletion), up(masks.insertion)
        terms = D(ud, 4) - J(ui, 5) + D(ud * ui, 6) - J(ud * ui, 7)
        return halved, terms, problem.regulariser(masks)

    expected, terms, regulariser = independent(masks)
    ours = jax.jit(problem.direction)(masks, t)
    scale = max(np.abs(expected.deletion).max(), np.abs(expected.insertion).max())
    np.testing.assert_allclose(np.asarray(ours.deletion), expected.deletion, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(np.asarray(ours.insertion), expected.insertion, rtol=0, atol=2e-5 * scale)
    objective = float(jax.jit(problem.objective)(masks, t, jnp.int32(0)))
    terms, regulariser = float(terms), float(regulariser)
    assert objective == pytest.approx(terms + regulariser, rel=1e-6, abs=1e-7)
    assert abs(objective - (terms / 2 + regulariser)) > 100 * 1e-6 * abs(objective)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_a_classifier_that_ignores_the_image_leaves_the_mask_at_one(variant, images):
    # Zero convolution weights: the logits are the same for every input and every gradient is 0.
    model = toy_model()
    params = jax.tree_util.tree_map(jnp.zeros_like, model.params)
    params["fc"]["bias"] = jnp.arange(10.0)
    blind = Model(model.module, params, "blind")
    result = run(blind, images[:2], variant, l1=1.0)
    np.testing.assert_array_equal(np.asarray(result.mask), 1.0)
    np.testing.assert_array_equal(np.asarray(result.saliency), 0.0)
    np.testing.assert_array_equal(np.asarray(result.trace.step_size), 1000.0)  # F' == F0: accepted


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_same_key_same_masks_and_the_key_only_feeds_the_noise(variant, model, images):
    first, again = run(model, images[:2], variant), run(model, images[:2], variant)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = run(model, images[:2], variant, key=jax.random.key(1))
    assert np.abs(np.asarray(other.trace.loss) - np.asarray(first.trace.loss)).max() > 1e-4
    quiet, silent = run(model, images[:2], variant, noise=0.0), run(model, images[:2], variant, noise=0.0, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(quiet.mask), np.asarray(silent.mask))  # the key only feeds the noise


def test_a_batch_of_eight_equals_eight_single_runs(model, images):
    keys = jax.random.split(jax.random.key(4), 8)
    config = CONFIGS["igos_pp"]
    together = igos_masks(model, images, variant="igos_pp", config=config, key=keys)
    trials = np.asarray(together.trace.trials)
    assert len(np.unique(trials[:, 0])) > 1  # images took different line searches
    for i in range(8):
        alone = igos_masks(model, images[i : i + 1], variant="igos_pp", config=config, key=keys[i : i + 1])
        np.testing.assert_array_equal(np.asarray(alone.trace.trials[0]), trials[i])
        for name in ("deletion_mask", "insertion_mask"):
            np.testing.assert_allclose(np.asarray(getattr(alone, name)[0]), np.asarray(getattr(together, name)[i]), atol=1e-5)


def test_nag_keeps_theta_unprojected(model, images):
    config = CONFIGS["igos"].replace(optimizer="nag")
    result = igos_masks(model, images[:2], config=config, key=jax.random.key(0), trace=True)
    np.testing.assert_array_equal(np.asarray(result.trace.step_size), 1000.0)  # fixed, no line search
    np.testing.assert_array_equal(np.asarray(result.trace.trials), 0)
    assert np.isfinite(np.asarray(result.trace.loss)).all()  # evaluated because trace=True
    # Its chain against a hand-written reference on a fixed direction sequence (igos.md 6.4:
    # e = i / (i + 3), theta_-1 = 0), small enough that every iterate stays inside the box, so the
    # momentum schedule decides the masks (a clipped iterate would hide it).
    directions = [np.array([0.3, -0.1]), np.array([0.2, 0.4]), np.array([-0.5, 0.1]), np.array([0.1, 0.2])]

    def by_hand(schedule):
        masks, theta_previous, iterates = np.array([0.5, 0.5]), np.zeros(2), []
        for i, g in enumerate(directions):
            theta = masks - 0.1 * g
            masks = np.clip(theta + schedule(i) * (theta - theta_previous), 0, 1)
            theta_previous = theta
            iterates.append(masks)
        return iterates

    expected = by_hand(lambda i: i / (i + 3))
    assert all(((m > 0.05) & (m < 0.95)).all() for m in expected)
    assert np.abs(expected[-1] - by_hand(lambda i: i / (i + 2))[-1]).max() > 1e-2  # the schedules differ
    chain = igos_optimizer(IGOSConfig(optimizer="nag", alpha0=0.1))
    params = jnp.array([0.5, 0.5])
    state = chain.init(params)
    for g, manual in zip(directions, expected):
        updates, state = chain.update(jnp.asarray(g, jnp.float32), state, params)
        params = igos_module.project_box(params + updates, 0.0, 1.0)
        np.testing.assert_allclose(np.asarray(params), manual, atol=1e-6)


# -------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(model, images):
    with pytest.raises(ConfigError, match="iterations must be an integer in \\[1, 1000000\\], got 0"):
        IGOSConfig(iterations=0)
    with pytest.raises(ValueError, match="mask_size 32 is larger than the images"):
        igos_masks(model, images[:1], config=IGOSConfig(mask_size=32), key=jax.random.key(0))
    with pytest.raises(ValueError, match="NaN or inf"):
        igos_masks(model, images[:1].at[0, 3, 3, 1].set(jnp.nan), config=CONFIGS["igos"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="stochastic"):
        igos_masks(model, images[:1], config=CONFIGS["igos"])
    with pytest.raises(TypeError, match="IGOSPlusConfig"):
        igos_masks(model, images[:1], variant="igos_pp", config=CONFIGS["igos"], key=jax.random.key(0))
    with pytest.raises(TypeError, match="jaxattr Model"):
        igos_masks(lambda x: x.mean((1, 2)), images[:1], config=CONFIGS["igos"], key=jax.random.key(0))
    with pytest.raises(ConfigError, match="decay must be < 1"):
        IGOSConfig(decay=1.0)


def test_a_saturated_softmax_and_a_mask_that_does_not_divide_the_image(images):
    saturated = toy_model(logit_scale=1e4)
    assert float(jnp.max(jax.nn.softmax(saturated(images[:2])), axis=-1).min()) == 1.0
    result = run(saturated, images[:2], "igos_pp")
    assert np.isfinite(np.asarray(result.mask)).all() and np.isfinite(np.asarray(result.trace.loss)).all()
    assert result.mask.shape == (2, CELLS, CELLS) and result.saliency.shape == (2, SIZE, SIZE)  # 5 into 16


def test_targets_as_an_index_or_per_image(model, images):
    one = run(model, images[:2], "igos", key=jax.random.key(0))
    assert np.asarray(one.targets).tolist() == np.argmax(model(images[:2]), axis=-1).tolist()
    same = igos_masks(model, images[:2], np.asarray(one.targets), config=CONFIGS["igos"], key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(same.mask), np.asarray(one.mask))
    other = igos_masks(model, images[:2], 3, config=CONFIGS["igos"], key=jax.random.key(0))
    assert np.asarray(other.targets).tolist() == [3, 3]
    with pytest.raises(TypeError, match="integer class indices"):
        igos_masks(model, images[:2], np.array([1.0, 2.0]), config=CONFIGS["igos"], key=jax.random.key(0))


def test_explain_returns_the_map_and_the_masks(model, images):
    result = explain(model, images[:2], "igos_pp", key=jax.random.key(0), config=CONFIGS["igos_pp"])
    masks = igos_masks(model, images[:2], variant="igos_pp", config=CONFIGS["igos_pp"], key=jax.random.key(0))
    assert set(result.extras) == {"mask", "deletion_mask", "insertion_mask"}
    np.testing.assert_array_equal(np.asarray(result.extras["mask"]), np.asarray(masks.mask))
    np.testing.assert_array_equal(np.asarray(result.maps), np.asarray(masks.saliency))
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1


# ------------------------------------------------------------------------------ parity (torch)


@pytest.fixture(scope="module")
def twin():
    """Random ResNet-18 with its head scaled by 8: a random network's near-uniform softmax barely
    moves the masks (|1 - mask| ~ 1e-5), which would make the comparison weak; this one moves them
    by ~0.05 on average and by up to ~0.3 (with PARITY's light regularisers)."""
    module = torch_model("resnet18")
    with torch.no_grad():
        module.fc.weight.mul_(8.0)
        module.fc.bias.mul_(8.0)
    model = from_torch("resnet18", module)
    return model, PixelInput(module, model.module.mean, model.module.std).eval()


PARITY = dict(iterations=3, steps=4, mask_size=8, l1=0.1, l2=1.0)


@pytest.mark.parametrize(
    "variant, dtype",
    [
        ("igos", "float64"),
        ("igos_pp", "float64"),
        ("igos", "float32"),
        pytest.param("igos_plus", "float64", marks=pytest.mark.slow),  # its pieces: in igos and igos_pp
    ],
)
def test_parity_with_the_pytorch_reference(variant, dtype, twin):
    # Same normalised image and baseline, same noise (jaxattr's draws fed to the reference in its
    # order); the reference runs one image at a time, with its own line search. float32 agrees
    # as long as no Armijo test is within rounding of a tie (§12.5): none is on these inputs.
    model, torch_model = twin
    images = np.random.RandomState(0).rand(1, 32, 32, 3)
    config = (IGOSConfig if variant == "igos" else IGOSPlusConfig)(**PARITY)
    result = crosscheck.run(variant, model, torch_model, images, None, dtype=dtype, config=config)
    assert result.ok, result


@pytest.mark.slow
def test_nag_parity_with_the_pytorch_reference(twin):
    model, torch_model = twin
    images = np.random.RandomState(1).rand(1, 32, 32, 3)
    config = IGOSConfig(**PARITY, optimizer="nag", alpha0=2.0)
    result = crosscheck.run("igos", model, torch_model, images, None, dtype="float64", config=config)
    assert result.ok, result
