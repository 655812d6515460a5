"""Method configs: frozen dataclasses that are pytrees, with one validator.

A config field is either

* `static`: it decides shapes or program structure (step counts, rule and layer names, chunk
  sizes). It is part of the pytree's structure, so each value compiles its own program;
* `traced`: a continuous hyper-parameter (a noise level, a regularisation weight). It is a pytree
  leaf, so a jit-compiled method takes it as a runtime scalar and a sweep over it compiles once.

Each field may carry a `Check`; `Literal` annotations are checked against their choices. A config
validates itself when built (`ConfigError`, a ValueError naming the field), and
`Config.validate_fields` holds cross-field rules. Two more hooks describe what settings cost:
`Config.needs_key` (settings that draw random numbers, such as a 'uniform' baseline, make any
method stochastic) and `Config.footprint` (what is held in memory at once, for `jaxattr.memory`). Traced values are only checked while concrete:
inside a trace they are tracers, and JAX rebuilds configs with arbitrary leaves when it maps over
pytrees.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any, Callable, Literal

import jax
import numpy as np

_TRACED = "jaxattr_traced"
_CHECK = "jaxattr_check"


class ConfigError(ValueError):
    """An invalid config value. `field` names the offending field (for the CLI's flag names)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Check:
    """A predicate on a field's value and the phrase completing "must be ..."."""

    accepts: Callable[[Any], bool]
    description: str


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    """An int in [minimum, maximum] (either bound optional)."""
    bounds = _bounds_text(minimum, maximum, False)
    return Check(
        lambda v: _is_int(v)
        and (minimum is None or v >= minimum)
        and (maximum is None or v <= maximum),
        f"an integer{bounds}",
    )


# The most a count of model calls per image may be (steps, samples, iterations): a million is hours
# per image on any accelerator, so a larger count is a typo, refused before it allocates its tables
# or runs for years.
MAX_PASSES = 1_000_000


def pass_count() -> Check:
    """A count of model calls per image: an integer in [1, MAX_PASSES]."""
    return integer(1, MAX_PASSES)


def number(
    minimum: float | None = None, maximum: float | None = None, *, exclusive_minimum: bool = False
) -> Check:
    """A finite real number in [minimum, maximum] ((minimum, maximum] with exclusive_minimum)."""
    bounds = _bounds_text(minimum, maximum, exclusive_minimum)

    def accepts(v):
        if not _is_real(v) or not math.isfinite(v):
            return False
        if minimum is not None and (v <= minimum if exclusive_minimum else v < minimum):
            return False
        return maximum is None or v <= maximum

    return Check(accepts, f"a finite number{bounds}")


def name() -> Check:
    """A non-empty string, such as a layer name (whether a model has it is checked on the model)."""
    return Check(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty name")


# A `chunk` field's value: evaluations per image in one model call. "auto" lets the batch decide
# (`jaxattr.methods.base.resolve_chunks`); None is everything at once.
AUTO_CHUNK = "auto"
Chunk = int | Literal["auto"] | None


def chunk_size() -> Check:
    return Check(lambda v: v is None or v == AUTO_CHUNK or (_is_int(v) and v >= 1), 'a positive integer, "auto" or None')


def optional(check: Check) -> Check:
    """None or a value `check` accepts."""
    return Check(lambda v: v is None or check.accepts(v), f"None or {check.description}")


def _bounds_text(minimum, maximum, exclusive_minimum) -> str:
    if minimum is not None and maximum is not None and not exclusive_minimum:
        return f" in [{minimum}, {maximum}]"
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return " " + " and ".join(parts) if parts else ""


def static(default: Any, check: Check | None = None) -> Any:
    """A structural field: part of the compiled program (one compilation per value)."""
    return dataclasses.field(default=default, metadata={_TRACED: False, _CHECK: check})


def traced(default: Any, check: Check | None = None) -> Any:
    """A continuous hyper-parameter: a runtime scalar of the compiled program."""
    return dataclasses.field(default=default, metadata={_TRACED: True, _CHECK: check})


def _is_concrete(value: Any) -> bool:
    """Whether a traced field holds a value to check now: a number, a string or a concrete scalar
    array, not a tracer or a placeholder JAX put there while mapping over pytrees."""
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return np.ndim(value) == 0
    return isinstance(value, (numbers.Number, str))


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, (jax.Array, np.ndarray, np.generic)) else value


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What a method holds in memory at once beyond the model, for `jaxattr.memory`'s estimates."""

    passes: int = 1  # forward+backward passes per image evaluated at once (path points, noise samples)
    fixed_bytes: int = 0  # host and device arrays the settings size alone (quadrature tables, kernels)


class Config:
    """Base of every method config (see the module docstring); subclasses are built with `@config`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        concrete = True
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get(_TRACED):
                if not _is_concrete(value):
                    concrete = False
                    continue
                value = _scalar(value)
            _check_field(type(self).__name__, field, hints.get(field.name), value)
        if concrete:
            self.validate_fields()

    def validate_fields(self) -> None:
        """Cross-field rules (raise ConfigError); fields have been checked one by one already."""

    def needs_key(self) -> bool:
        """Whether these settings draw random numbers (a 'uniform' baseline): the method then takes
        a key, as a stochastic method does."""
        return False

    def footprint(self, image_shape: tuple[int, ...]) -> Footprint:
        """Memory these settings hold per image of `image_shape` (h, w, c); default: one
        forward+backward pass per image."""
        return Footprint()

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (nested values with a `to_dict` rendered through it), for
        summaries and reports."""
        return {
            f.name: (v.to_dict() if hasattr(v := getattr(self, f.name), "to_dict") else v)
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> "Config":
        """A copy with `changes` applied and validated; an unknown name is a ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(
                unknown[0], f"{type(self).__name__} has no option {', '.join(unknown)}; options: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **changes)


def _check_field(owner: str, field: dataclasses.Field, annotation: Any, value: Any) -> None:
    choices = literal_choices(annotation)
    if choices is not None and value not in choices:
        raise ConfigError(field.name, f"unknown {field.name} {value!r}; expected one of {choices}")
    if annotation is bool and not isinstance(value, (bool, np.bool_)):
        raise ConfigError(field.name, f"{field.name} must be True or False, got {value!r}")
    check = field.metadata.get(_CHECK)
    if check is not None and not check.accepts(value):
        raise ConfigError(field.name, f"{field.name} must be {check.description}, got {value!r}")


def literal_choices(annotation: Any) -> tuple | None:
    """The choices of a `Literal[...]` annotation (also inside Optional), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1 and typing.get_origin(inner[0]) is Literal:
            return (*typing.get_args(inner[0]), None)
    return None


def config(cls: type) -> type:
    """Make `cls` (a subclass of Config) a frozen dataclass and a pytree whose traced fields are
    leaves and whose static fields are structure."""
    if not issubclass(cls, Config):
        raise TypeError(f"@config classes derive from jaxattr.config.Config; {cls.__name__} does not")
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    unmarked = [f.name for f in fields if _TRACED not in f.metadata]
    if unmarked:
        raise TypeError(f"{cls.__name__}: declare {', '.join(unmarked)} with config.static(...) or config.traced(...)")
    jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in fields if f.metadata[_TRACED]],
        meta_fields=[f.name for f in fields if not f.metadata[_TRACED]],
    )
    return cls


def is_traced(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(_TRACED))
