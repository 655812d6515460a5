"""jaxattr.memory: the estimate bounds what XLA says the compiled program needs, and `fit` picks
the largest chunk within a budget or refuses with the numbers. A tiny ResNet at 32x32 (one
compilation per case)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import memory
from jaxattr.explanation import explain
from jaxattr.methods import method_spec, resolve_chunks
from test_methods_contract import tiny_model

SHAPE = (32, 32, 3)
BATCH = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _compiled_bytes(model, method) -> int:
    """XLA's own account of the compiled program: arguments, outputs and temporaries."""
    images = jnp.asarray(np.random.default_rng(0).random((BATCH, *SHAPE), np.float32))
    key = jax.random.key(0) if method.stochastic else None
    compiled = jax.jit(lambda x: explain(model, x, method, key=key).attributions).lower(images).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes


@pytest.mark.parametrize("name, options", [("integrated_gradients", {"steps": 16}), ("smoothgrad", {"samples": 8})])
def test_the_estimate_bounds_the_compiled_program(model, name, options):
    method = method_spec(name).build(**options)
    estimated = memory.estimate(method, model, BATCH, SHAPE).bytes
    compiled = _compiled_bytes(model, method)
    # An upper bound, and not a uselessly loose one. (SmoothGrad of saliency at batch 2 is the
    # loosest: XLA:CPU reuses one sample's buffers for the next, 23x below the estimate since the
    # CPU convolution forms of jaxattr.nn.)
    assert compiled <= estimated <= 32 * compiled, (compiled, estimated)


def test_fit_picks_the_largest_power_of_two_chunk_within_the_budget(model):
    method = method_spec("integrated_gradients").build(steps=64, chunk=None)
    full = memory.estimate(method, model, BATCH, SHAPE).bytes
    assert memory.fit(method, model, BATCH, SHAPE, budget=full) is method  # fits: unchanged
    needs = lambda chunk: memory.estimate(method_spec("integrated_gradients").build(steps=64, chunk=chunk), model, BATCH, SHAPE).bytes
    for budget in (needs(8), needs(10), needs(16) - 1):  # the same program for any budget from chunk 8 up to 16
        fitted = memory.fit(method, model, BATCH, SHAPE, budget=budget)
        assert fitted.config.chunk == 8 and fitted.config.steps == 64
    assert memory.fit(method, model, BATCH, SHAPE, budget=needs(16)).config.chunk == 16
    with pytest.raises(memory.MemoryEstimateError, match="needs about .* more than the"):
        memory.fit(method, model, BATCH, SHAPE, budget=1000)


def test_smoothgrad_chunks_its_samples_first_then_its_base(model):
    all_steps = method_spec("integrated_gradients").build(chunk=None)
    method = method_spec("smoothgrad").build(samples=8, chunk=None, base=all_steps)
    base_steps = method.config.base.config.steps
    one_sample = memory.estimate(method_spec("smoothgrad").build(samples=8, chunk=1, base=all_steps), model, BATCH, SHAPE).bytes
    fitted = memory.fit(method, model, BATCH, SHAPE, budget=one_sample)
    assert fitted.config.chunk == 1 and fitted.config.base.config.chunk is None
    fitted = memory.fit(method, model, BATCH, SHAPE, budget=one_sample - 1)
    assert fitted.config.chunk == 1 and 1 <= fitted.config.base.config.chunk < base_steps


def test_auto_chunks_hold_32_images_per_call_on_cpu_innermost_first():
    ig = lambda steps: method_spec("integrated_gradients").build(steps=steps).config
    assert resolve_chunks(ig(32), 4, SHAPE).chunk == 8  # 4 images x 8 steps per call
    assert resolve_chunks(ig(50), 3, SHAPE).chunk == 10  # 30 images per call, 5 equal chunks
    assert resolve_chunks(ig(50), 1, SHAPE).chunk == 25  # two equal chunks, not 32 and 18: one shape to compile
    assert resolve_chunks(ig(50), 4, SHAPE).chunk == 5  # 8 allowed; 5 divides 50
    assert resolve_chunks(ig(97), 4, SHAPE).chunk == 8  # a prime: 12 chunks of 8 and one of 1
    assert resolve_chunks(ig(50), 64, SHAPE).chunk == 1  # never below one point per image
    assert resolve_chunks(ig(8), 1, SHAPE).chunk == 8  # all steps fit in one call
    assert resolve_chunks(ig(50).replace(chunk=None), 4, SHAPE).chunk is None  # None: all at once, as asked
    # SmoothGrad of IG: the base's steps take the share first, then the samples what is left.
    nested = method_spec("smoothgrad").build(samples=10, base=method_spec("integrated_gradients").build(steps=4))
    resolved = resolve_chunks(nested.config, 2, SHAPE)
    assert (resolved.chunk, resolved.base.config.chunk) == (2, 4)  # 2 images x 2 samples x 4 steps
    resolved = resolve_chunks(nested.config, 1, SHAPE)
    assert (resolved.chunk, resolved.base.config.chunk) == (5, 4)  # 20 of 32: 10 samples in two equal chunks
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, "default_backend", lambda: "gpu")  # elsewhere: everything at once
        resolved = resolve_chunks(nested.config, 2, SHAPE)
        assert resolved.chunk is None and resolved.base.config.chunk is None


def test_fit_shrinks_auto_chunks_and_never_grows_them(model):
    method = method_spec("integrated_gradients").build(steps=64)  # chunk "auto": 16 at batch 2
    resolved = method_spec("integrated_gradients").build(steps=64, chunk=16)
    assert memory.estimate(method, model, BATCH, SHAPE) == memory.estimate(resolved, model, BATCH, SHAPE)
    roomy = memory.estimate(method_spec("integrated_gradients").build(steps=64, chunk=None), model, BATCH, SHAPE).bytes
    assert memory.fit(method, model, BATCH, SHAPE, budget=roomy) is method  # fits: left to the call
    needs_4 = memory.estimate(method_spec("integrated_gradients").build(steps=64, chunk=4), model, BATCH, SHAPE).bytes
    assert memory.fit(method, model, BATCH, SHAPE, budget=needs_4).config.chunk == 4
    given = method_spec("integrated_gradients").build(steps=64, chunk=16)  # the user's chunk is kept
    with pytest.raises(memory.MemoryEstimateError):
        memory.fit(given, model, BATCH, SHAPE, budget=needs_4)


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_VARIABLE, "1.5G")
    assert memory.default_budget() == int(1.5 * 2**30)
    monkeypatch.setenv(memory.BUDGET_VARIABLE, "lots")
    with pytest.raises(memory.MemoryEstimateError, match=memory.BUDGET_VARIABLE):
        memory.default_budget()
