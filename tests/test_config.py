"""Method configs: typed choices, one validator, static structure and traced hyper-parameters."""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import cli
from jaxattr.config import Config, ConfigError, config, integer, number, optional, static, traced
from jaxattr.methods import gradients, list_methods, method_spec
from jaxattr.methods.gradients import SmoothGradConfig, smoothgrad


@config
class Example(Config):
    kind: Literal["a", "b"] = static("a")
    steps: int = static(3, integer(1))
    chunk: int | None = static(None, optional(integer(1)))
    weight: float = traced(0.5, number(0, 1))



def test_fields_are_checked_by_one_validator():
    assert Example().steps == 3
    for bad, field in [
        (dict(kind="c"), "kind"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=True), "steps"),
        (dict(chunk=0), "chunk"),
        (dict(weight=1.5), "weight"),
        (dict(weight=float("nan")), "weight"),
        (dict(weight="0.5"), "weight"),
    ]:
        with pytest.raises(ConfigError) as error:
            Example(**bad)
        assert error.value.field == field
    assert "unknown kind 'c'; expected one of ('a', 'b')" in str(_error(kind="c"))
    assert "steps must be an integer >= 1, got 0" in str(_error(steps=0))
    assert "weight must be a finite number in [0, 1], got 1.5" in str(_error(weight=1.5))
    with pytest.raises(ConfigError, match="has no option stepz"):
        Example().replace(stepz=2)


def _error(**kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        Example(**kwargs)
    return error.value


def test_static_fields_are_structure_and_traced_fields_are_leaves():
    leaves, treedef = jax.tree_util.tree_flatten(Example(weight=0.25))
    assert leaves == [0.25]
    assert jax.tree_util.tree_unflatten(treedef, [0.75]) == Example(weight=0.75)
    assert jax.tree_util.tree_structure(Example(steps=4)) != treedef  # another program
    # Inside a trace the traced field is a tracer and is not checked; concrete arrays are.
    jax.jit(lambda c: c.weight * 2)(Example())
    with pytest.raises(ConfigError):
        Example(weight=jnp.asarray(2.0))


def test_every_config_field_is_declared_static_or_traced():
    with pytest.raises(TypeError, match="declare x with config.static"):

        @config
        class Unmarked(Config):
            x: int = 1

    for name in list_methods():
        fields = dataclasses.fields(method_spec(name).config)
        assert fields and all("jaxattr_traced" in f.metadata for f in fields), name


def test_five_noise_levels_compile_once():
    forward = jax.tree_util.Partial(lambda x: jnp.sum(jnp.sin(x), axis=(1, 2)))
    x = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32))
    before = gradients._smoothgrad._cache_size()
    maps = [
        smoothgrad(forward, x, 0, config=SmoothGradConfig(samples=2, stdev=s), key=jax.random.key(0))
        for s in (0.05, 0.1, 0.15, 0.2, 0.25)
    ]
    assert gradients._smoothgrad._cache_size() == before + 1
    assert all(not np.array_equal(maps[0], m) for m in maps[1:])  # the level reaches the program
    smoothgrad(forward, x, 0, config=SmoothGradConfig(samples=3), key=jax.random.key(0))
    assert gradients._smoothgrad._cache_size() == before + 2  # a structural field compiles anew


@pytest.mark.parametrize(
    "option, message",
    [
        (["--method", "integrated_gradients", "--steps", "0"], "argument --steps: steps must be an integer in [1, 1000000], got 0"),
        (["--method", "integrated_gradients", "--rule", "riemann_left", "--steps", "1"], "argument --steps: rule 'riemann_left' needs"),
        (["--method", "smoothgrad", "--stdev", "-1"], "argument --stdev: stdev must be a finite number >= 0, got -1.0"),
        (["--method", "smoothgrad", "--base", "magic"], "argument --base: unknown method 'magic'"),
        (["--method", "smoothgrad", "--base", "smoothgrad"], "argument --base: base must be a method"),
        (["--method", "guided_ig", "--fraction", "2"], "argument --fraction: fraction must be a finite number in [0, 1]"),
        (["--method", "blur_ig", "--grad-step", "0"], "argument --grad-step: grad_step must be a finite number > 0"),
    ],
)
def test_cli_config_errors_are_one_usage_line(option, message, tmp_path, capsys):
    image = tmp_path / "x.png"
    assert cli.main(["explain", str(image), "--out", str(tmp_path / "o"), *option]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "error: argument" in err  # one line


def test_help_shows_metavars_and_choices(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["explain", "--method", "integrated_gradients", "--help"])
    out = capsys.readouterr().out
    assert "--steps N" in out and "--blur-sigma X" in out
    assert "--rule {gausslegendre,gausslegendre64,riemann_left" in out and "--baseline {black,mean,blur,uniform}" in out
    assert "CONFIG:" not in out
