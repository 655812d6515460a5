"""jaxattr.nn primitives against torch, and the guided backward rules against converters.guided."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from converters.guided import guided
from converters.torch_models import to_numpy_nhwc, to_torch_images
from jaxattr import nn
from jaxattr.models.weights import params_from_state_dict


def _flax_twin(flax_module, torch_module, x):
    """`flax_module` applied with the weights of `torch_module` (through the torch naming rule)."""
    template = flax_module.init(jax.random.key(0), x)["params"]
    params = params_from_state_dict(torch_module.state_dict(), template, source="torch layer")
    return lambda v: flax_module.apply({"params": params}, v)


def _torch_nhwc(torch_fn, x):
    """torch_fn on NHWC numpy input, output back in NHWC."""
    with torch.no_grad():
        return to_numpy_nhwc(torch_fn(to_torch_images(x)))


def _vjp(fn, x, g):
    _, pullback = jax.vjp(fn, jnp.asarray(x))
    return np.asarray(pullback(jnp.asarray(g))[0])


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, primals, g):
    """(fn(*primals), the cotangents of `primals` for upstream g), compiled as one program."""
    y, pullback = jax.vjp(fn, *primals)
    return y, pullback(g)


def _torch_vjp(torch_fn, x, g):
    """d<torch_fn(x), g>/dx for NHWC numpy x and g."""
    xt = to_torch_images(x).requires_grad_()
    torch_fn(xt).backward(to_torch_images(g))
    return to_numpy_nhwc(xt.grad)


# ------------------------------------------------------------------------------ layers


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, stride, padding, groups, bias, size",
    [
        (3, 8, 7, 2, 3, 1, False, (17, 14)),  # ResNet's stem (on CPU: the space-to-depth backward)
        (8, 8, 3, 1, 1, 1, True, (9, 9)),  # few input channels: a matrix-product backward
        (16, 8, 3, 1, 1, 1, True, (9, 9)),  # (on CPU: the flipped-kernel backward)
        (3, 5, (3, 5), 1, (0, 2), 1, True, (7, 9)),
        (8, 16, 3, 2, 1, 1, True, (10, 7)),
        (5, 7, 3, 2, 0, 1, True, (8, 9)),  # the last input row and column are in no window
        (8, 8, 3, 2, 1, 8, False, (11, 12)),  # depthwise (on CPU: the shifted-sum form)
        (6, 6, 5, 2, 2, 6, True, (13, 10)),  # depthwise
        (8, 12, (1, 3), (2, 1), (0, 1), 4, True, (8, 5)),  # grouped
        (4, 6, 1, 1, 0, 1, False, (5, 6)),  # 1x1 (on CPU: a matrix product)
        (6, 10, 1, 2, 0, 1, True, (7, 6)),  # strided 1x1 on an odd size: sliced, then a product
        (4, 6, 1, 1, 1, 1, True, (5, 4)),  # padded 1x1: a convolution
        (5, 6, (1, 3), (2, 1), (0, 1), 1, False, (9, 5)),
        (3, 8, 4, 4, 0, 1, True, (9, 10)),  # ViT's patches: the space-to-depth backward is a product
        (3, 8, 3, 2, 0, 1, True, (10, 11)),
        (20, 8, 3, 2, 1, 1, True, (9, 8)),  # strided, many channels: an input-dilated backward
        (32, 32, 3, 1, 1, 1, False, (3, 4)),  # 12 output cells, 9 taps: still the flipped-kernel backward
        (20, 24, 3, 2, 1, 1, True, (5, 4)),  # the same, strided (3x2 outputs: on CPU a matrix product)
        (16, 8, 3, 1, 1, 1, True, (2, 2)),  # activations smaller than the kernel (on CPU: a matrix product)
        (12, 8, 3, 2, 1, 1, False, (4, 3)),  # the same, strided
    ],
)
def test_conv2d_values_and_gradients_match_torch(rng, in_channels, out_channels, kernel, stride, padding, groups, bias, size):
    torch_conv = torch.nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=bias)
    x = rng.randn(2, *size, in_channels).astype(np.float32)
    module = nn.Conv2d(out_channels, kernel, stride, padding, groups, use_bias=bias)
    params = params_from_state_dict(torch_conv.state_dict(), module.init(jax.random.key(0), x)["params"], source="torch layer")
    xt = to_torch_images(x).requires_grad_()
    yt = torch_conv(xt)
    # Input and parameter gradients for a random upstream gradient (the parameters' only by
    # JAX's own rule, but through the same CPU forms).
    g = rng.randn(*to_numpy_nhwc(yt).shape).astype(np.float32)
    y, (dx, dparams) = _value_and_vjp(lambda v, p: module.apply({"params": p}, v), (x, params), g)
    np.testing.assert_allclose(y, to_numpy_nhwc(yt), rtol=0, atol=1e-5)
    yt.backward(to_torch_images(g))
    np.testing.assert_allclose(dx, to_numpy_nhwc(xt.grad), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dparams["kernel"], torch_conv.weight.grad.numpy().transpose(2, 3, 1, 0), rtol=0, atol=2e-5)
    if bias:
        np.testing.assert_allclose(dparams["bias"], torch_conv.bias.grad.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("stride, size", [(1, (11, 9)), (2, (11, 9)), (2, (10, 12))])
def test_conv2d_tf_same_padding_values_and_gradients(rng, stride, size):
    # TensorFlow SAME: asymmetric padding (the odd cell at the bottom/right), as a reference
    # the plain convolution on the explicitly padded input.
    x = rng.randn(2, *size, 4).astype(np.float32)
    module = nn.Conv2d(6, 3, stride, "tf_same", use_bias=False)
    params = module.init(jax.random.key(1), x)["params"]
    pads = [nn.tf_same_padding(n, 3, stride) for n in size]
    reference = lambda v: jax.lax.conv_general_dilated(
        jnp.pad(v, ((0, 0), *pads, (0, 0))), params["kernel"], (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    got = lambda v: module.apply({"params": params}, v)
    expected = reference(x)
    np.testing.assert_allclose(got(x), expected, rtol=0, atol=1e-5)
    g = rng.randn(*expected.shape).astype(np.float32)
    np.testing.assert_allclose(_vjp(got, x, g), _vjp(reference, x, g), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kernel, strides, padding, size",
    [
        (3, (1, 1), ((1, 1), (1, 1)), (9, 8)),
        (5, (2, 2), ((1, 2), (1, 2)), (12, 11)),  # TensorFlow SAME: asymmetric
        (3, (2, 1), ((0, 1), (2, 0)), (7, 10)),
    ],
)
def test_depthwise_conv_by_shifts_equals_the_grouped_convolution(rng, kernel, strides, padding, size):
    x = rng.randn(2, *size, 5).astype(np.float32)
    w = rng.randn(kernel, kernel, 1, 5).astype(np.float32)
    native = lambda v: jax.lax.conv_general_dilated(
        v, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=5
    )
    shifted = lambda v: nn.depthwise_conv_by_shifts(v, w, strides, padding)
    expected = native(x)
    np.testing.assert_allclose(shifted(x), expected, rtol=0, atol=1e-5)
    g = rng.randn(*expected.shape).astype(np.float32)
    np.testing.assert_allclose(_vjp(shifted, x, g), _vjp(native, x, g), rtol=0, atol=1e-5)


def test_linear_matches_torch(rng):
    torch_linear = torch.nn.Linear(37, 11)
    x = rng.randn(4, 37).astype(np.float32)
    linear = _flax_twin(nn.Linear(11), torch_linear, x)
    with torch.no_grad():
        expected = torch_linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(linear(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_batchnorm2d_eval_matches_torch(rng, eps):
    torch_bn = torch.nn.BatchNorm2d(6, eps=eps)
    with torch.no_grad():
        torch_bn.running_mean.copy_(torch.from_numpy(rng.randn(6).astype(np.float32)))
        torch_bn.running_var.copy_(torch.from_numpy(rng.rand(6).astype(np.float32) * 1e-2))  # eps matters
        torch_bn.weight.copy_(torch.from_numpy(rng.randn(6).astype(np.float32)))
        torch_bn.bias.copy_(torch.from_numpy(rng.randn(6).astype(np.float32)))
    torch_bn.eval()
    x = rng.randn(2, 5, 7, 6).astype(np.float32)
    bn = _flax_twin(nn.BatchNorm2d(eps=eps), torch_bn, x)
    expected = _torch_nhwc(torch_bn, x)
    np.testing.assert_allclose(bn(x), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("scale, offset", [(1e-3, 0.0), (1.0, 5.0)])  # variance ~ eps; a large mean
def test_layernorm_matches_torch(rng, eps, scale, offset):
    torch_ln = torch.nn.LayerNorm(24, eps=eps)
    with torch.no_grad():
        torch_ln.weight.copy_(torch.from_numpy(rng.randn(24).astype(np.float32)))
        torch_ln.bias.copy_(torch.from_numpy(rng.randn(24).astype(np.float32)))
    x = (rng.randn(3, 5, 24) * scale + offset).astype(np.float32)
    ln = _flax_twin(nn.LayerNorm(eps=eps), torch_ln, x)
    with torch.no_grad():
        expected = torch_ln(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ln(x), expected, rtol=0, atol=1e-4)


def test_gelu_is_torchs_exact_gelu(rng):
    x = rng.randn(1000).astype(np.float32) * 3
    expected = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(nn.gelu(jnp.asarray(x)), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ pooling

# (height, width), kernel, stride, padding, ceil_mode
POOLS = [
    ((8, 8), 2, 2, 0, False),  # VGG
    ((7, 9), 2, 2, 0, False),  # odd sizes drop the last row/column
    ((8, 9), 3, 2, 1, False),  # ResNet stem
    ((7, 7), 3, 2, 1, False),
    ((7, 7), 2, 2, 0, True),  # GoogLeNet maxpool4 on an odd size
    ((8, 11), 3, 2, 0, True),  # GoogLeNet maxpool1-3
    ((9, 10), 3, 2, 0, True),
    ((6, 7), 3, 1, 1, True),  # GoogLeNet inception branch 4
    ((5, 6), 2, 2, 1, True),  # the ceil window that would start in the right padding is dropped
    ((10, 13), 3, 3, 1, True),
    ((13, 6), (3, 2), (2, 1), (1, 0), True),  # non-square kernel, stride and padding
    ((4, 4), 4, 4, 0, False),
    ((3, 5), 1, 1, 0, False),
]
POOL_IDS = [f"{h}x{w}-k{k}-s{s}-p{p}{'-ceil' if c else ''}" for (h, w), k, s, p, c in POOLS]


def _pools(pool_spec):
    """(jaxattr pool for a mode, torch pool module) for one POOLS entry."""
    _, kernel, stride, padding, ceil_mode = pool_spec
    torch_pool = torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    return (
        lambda mode: lambda x: nn.max_pool2d(x, kernel, stride, padding, ceil_mode, nonlinearity=mode),
        torch_pool,
    )


# Inputs for the pool parity tests: continuous values (no ties in a window); small integers
# (many tied maxima, torch's first-maximum rule decides); a constant (every window tied); and
# NaN and -inf among small integers (windows whose only input cells are -inf, and NaN maxima).
POOL_INPUTS = ["continuous", "ties", "constant", "non-finite"]


def _pool_input(rng, pool_spec, kind="continuous"):
    h, w = pool_spec[0]
    shape = (2, h, w, 3)
    if kind == "continuous":
        return rng.randn(*shape).astype(np.float32)
    if kind == "constant":
        return np.full(shape, 0.5, np.float32)
    x = rng.randint(-1, 2, shape).astype(np.float32)
    if kind == "non-finite":
        x[rng.rand(*shape) < 0.5] = -np.inf
        x[rng.rand(*shape) < 0.1] = np.nan
    return x


@pytest.mark.parametrize("kind", POOL_INPUTS)
@pytest.mark.parametrize("pool_spec", POOLS, ids=POOL_IDS)
def test_max_pool2d_forward_matches_torch(rng, pool_spec, kind):
    pool, torch_pool = _pools(pool_spec)
    x = _pool_input(rng, pool_spec, kind)
    expected = _torch_nhwc(torch_pool, x)
    got = np.asarray(pool("standard")(x))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", POOL_INPUTS)
@pytest.mark.parametrize("pool_spec", POOLS, ids=POOL_IDS)
def test_max_pool2d_standard_vjp_is_torchs_bit_for_bit(rng, pool_spec, kind):
    # Bit-identical: the same winner per window (ties, -inf-only windows, NaN), and overlapping
    # windows' gradients summed in torch's order.
    pool, torch_pool = _pools(pool_spec)
    x = _pool_input(rng, pool_spec, kind)
    g = rng.randn(*pool("standard")(x).shape).astype(np.float32)
    expected = _torch_vjp(torch_pool, x, g)
    np.testing.assert_array_equal(_vjp(pool("standard"), x, g), expected)
    # "guided_relu" guides ReLUs only; its max-pool is the ordinary one.
    np.testing.assert_array_equal(_vjp(pool("guided_relu"), x, g), expected)


@pytest.mark.parametrize("kind", POOL_INPUTS)
@pytest.mark.parametrize("pool_spec", POOLS, ids=POOL_IDS)
def test_max_pool2d_gnl_vjp_is_the_torch_rules_bit_for_bit(rng, pool_spec, kind):
    pool, torch_pool = _pools(pool_spec)
    x = _pool_input(rng, pool_spec, kind)
    g = rng.randn(*pool("standard")(x).shape).astype(np.float32)
    with guided(torch_pool, mode="guided"):
        expected = _torch_vjp(torch_pool, x, g)
    got = _vjp(pool("guided"), x, g)
    np.testing.assert_array_equal(got, expected)
    if kind == "continuous":
        assert not np.array_equal(got, _vjp(pool("standard"), x, g))  # the rule did something


def test_max_pool2d_gradient_of_overlapping_windows_sums_in_torchs_order():
    # A k3 s1 pool over [1, 1, 5, 1, 1]: column 2 wins all three windows, so its gradient is
    # g0 + g1 + g2, added in that order by torch. In float32, (1 + 1e8) - 1e8 = 0, while the
    # reverse order gives (-1e8 + 1e8) + 1 = 1.
    x = np.array([1.0, 1.0, 5.0, 1.0, 1.0], np.float32).reshape(1, 1, 5, 1)
    g = np.array([1.0, 1e8, -1e8], np.float32).reshape(1, 1, 3, 1)
    torch_pool = torch.nn.MaxPool2d((1, 3), 1)
    expected = _torch_vjp(torch_pool, x, g)
    got = _vjp(lambda v: nn.max_pool2d(v, (1, 3), 1), x, g)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got.ravel(), [0.0, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "upstream, expected",
    [
        ([-1.0, 2.0], [0.0, 0.0, 0.0, 0.0]),  # the routing window's gradient is positive, yet blocked
        ([1.0, -2.0], [1.0, -2.0, 0.0, 0.0]),  # a negative routed gradient passes
    ],
)
def test_gnl_max_pool_mask_comes_from_the_output_grid_not_the_routing_window(upstream, expected):
    # A k3 s2 p1 pool along 4 columns: output 0 covers columns {0, 1}, output 1 columns {1, 2, 3}.
    # Column 1 is the maximum of window 1 only, but its mask is taken from output
    # floor(1 * 2 / 4) = 0 (gnl.md 2.4, reproduced literally).
    x = np.array([9.0, 5.0, 3.0, 1.0], np.float32).reshape(1, 1, 4, 1)
    g = np.array(upstream, np.float32).reshape(1, 1, 2, 1)
    got = _vjp(lambda v: nn.max_pool2d(v, (1, 3), (1, 2), (0, 1), nonlinearity="guided"), x, g)
    np.testing.assert_array_equal(got.ravel(), expected)
    torch_pool = torch.nn.MaxPool2d((1, 3), (1, 2), (0, 1))
    with guided(torch_pool):
        np.testing.assert_array_equal(_torch_vjp(torch_pool, x, g).ravel(), expected)


@pytest.mark.parametrize("pool_spec", POOLS[:8], ids=POOL_IDS[:8])
def test_gnl_max_pool_equals_standard_for_positive_upstream_gradients(rng, pool_spec):
    pool, _ = _pools(pool_spec)
    x = _pool_input(rng, pool_spec)
    g = rng.rand(*pool("standard")(x).shape).astype(np.float32) + 0.1
    np.testing.assert_array_equal(_vjp(pool("guided"), x, g), _vjp(pool("standard"), x, g))


@pytest.mark.parametrize(
    "size, output_size",
    [((14, 14), 7), ((13, 10), 7), ((5, 3), 7), ((9, 9), (4, 3)), ((7, 6), 1), ((7, 7), 7), ((2, 1), 7)],
)
def test_adaptive_avg_pool2d_matches_torch(rng, size, output_size):
    x = rng.randn(2, *size, 4).astype(np.float32)
    expected = _torch_nhwc(lambda t: F.adaptive_avg_pool2d(t, output_size), x)
    got = np.asarray(nn.adaptive_avg_pool2d(jnp.asarray(x), output_size))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ ReLU, ReLU6

_EDGES = np.array([-2.0, -1e-7, 0.0, 1e-7, 0.5, 5.9, 6.0, 6.1, 9.0], np.float32)


def _relu_inputs(rng):
    """Edge values (0 and 6 exactly) crossed with gradients of both signs, plus random values."""
    x = np.concatenate([np.repeat(_EDGES, 2), rng.randn(200).astype(np.float32) * 4])
    g = np.concatenate([np.tile([1.5, -0.5], len(_EDGES)), rng.randn(200).astype(np.float32)])
    return x, g


@pytest.mark.parametrize("fn, torch_fn", [(nn.relu, torch.relu), (nn.relu6, F.relu6)], ids=["relu", "relu6"])
def test_standard_relus_match_torch_values_and_gradients(rng, fn, torch_fn):
    x, g = _relu_inputs(rng)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch_fn(xt)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(fn(jnp.asarray(x)), yt.detach().numpy())
    np.testing.assert_array_equal(_vjp(fn, x, g), xt.grad.numpy())


@pytest.mark.parametrize("mode", ["standard", "guided", "guided_relu"])
def test_relu_gradient_is_zero_at_exactly_zero(mode):
    grad = jax.grad(lambda v: nn.relu(v, mode).sum())(jnp.zeros(3))
    np.testing.assert_array_equal(grad, np.zeros(3))


@pytest.mark.parametrize("mode", ["guided", "guided_relu"])
@pytest.mark.parametrize(
    "fn, torch_module, upper",
    [(nn.relu, torch.nn.ReLU(inplace=True), np.inf), (nn.relu6, torch.nn.ReLU6(inplace=True), 6.0)],
    ids=["relu", "relu6"],
)
def test_guided_relus_vjp(rng, mode, fn, torch_module, upper):
    x, g = _relu_inputs(rng)
    expected = np.where((x > 0) & (x < upper) & (g > 0), g, 0)
    got = _vjp(lambda v: fn(v, mode), x, g)
    np.testing.assert_array_equal(got, expected)
    xt = torch.from_numpy(x).requires_grad_()
    with guided(torch_module, mode=mode):
        torch_module(xt * 1).backward(torch.from_numpy(g))  # `* 1`: in-place modules need a non-leaf
    np.testing.assert_array_equal(xt.grad.numpy(), expected)


def test_guided_rules_survive_reused_inplace_modules(rng):
    # ResNet's Bottleneck calls one in-place ReLU three times; every call must be guided.
    relu = torch.nn.ReLU(inplace=True)
    a = torch.from_numpy(rng.randn(50).astype(np.float32)).requires_grad_()
    g = torch.from_numpy(rng.randn(50).astype(np.float32))
    with guided(relu, mode="guided_relu"):
        relu(relu(a * 2) - 0.5).backward(g)
    y1 = np.maximum(a.detach().numpy() * 2, 0)
    expected = 2 * np.where((a.detach().numpy() > 0) & (y1 - 0.5 > 0) & (g.numpy() > 0), g.numpy(), 0)
    np.testing.assert_array_equal(a.grad.numpy(), expected)


def test_guided_restores_the_torch_model(rng):
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    x = torch.from_numpy(rng.randn(1, 1, 4, 4).astype(np.float32))
    with guided(model):
        assert "forward" in vars(model[0]) and "forward" in vars(model[1])
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
    torch.testing.assert_close(model(x), F.max_pool2d(torch.relu(x), 2))


def test_unknown_nonlinearity_is_an_error():
    with pytest.raises(ValueError, match="unknown nonlinearity 'guide'.*standard"):
        with guided(torch.nn.ReLU(), mode="guide"):
            pass


def test_max_pool2d_rejects_inputs_too_small_and_windows_too_large():
    with pytest.raises(RuntimeError, match="too small"):
        F.max_pool2d(torch.ones(1, 2, 1, 1), 2, 2)
    with pytest.raises(ValueError, match="input size 1 is too small for kernel 2"):
        nn.max_pool2d(jnp.ones((1, 1, 5, 2)), 2, 2)
    with pytest.raises(ValueError, match="17x16 window has more than 256 cells"):
        nn.max_pool2d(jnp.ones((1, 20, 20, 2)), (17, 16))
