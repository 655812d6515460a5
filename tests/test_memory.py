"""jaxattr.memory: the estimate bounds what XLA says the compiled program needs, and `fit` picks
the largest chunk within a budget or refuses with the numbers. A tiny ResNet at 32x32 (one
compilation per case)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import memory
from jaxattr.explanation import explain
from jaxattr.methods import method_spec
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
    method = method_spec("integrated_gradients").build(steps=64)
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
    method = method_spec("smoothgrad").build(samples=8, base=method_spec("integrated_gradients").build())
    base_steps = method.config.base.config.steps
    one_sample = memory.estimate(
        method_spec("smoothgrad").build(samples=8, chunk=1, base=method_spec("integrated_gradients").build()), model, BATCH, SHAPE
    ).bytes
    fitted = memory.fit(method, model, BATCH, SHAPE, budget=one_sample)
    assert fitted.config.chunk == 1 and fitted.config.base.config.chunk is None
    fitted = memory.fit(method, model, BATCH, SHAPE, budget=one_sample - 1)
    assert fitted.config.chunk == 1 and 1 <= fitted.config.base.config.chunk < base_steps


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_VARIABLE, "1.5G")
    assert memory.default_budget() == int(1.5 * 2**30)
    monkeypatch.setenv(memory.BUDGET_VARIABLE, "lots")
    with pytest.raises(memory.MemoryEstimateError, match=memory.BUDGET_VARIABLE):
        memory.default_budget()
