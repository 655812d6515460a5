"""One registry of attribution methods, used by the CLI and `jaxattr.explain`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxtyping import Array


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable  # fn(forward, images, targets=None, *, config=None, key=None) -> attributions
    config: type  # frozen dataclass holding the reference's defaults
    # attributions (batch first) -> (b, h', w') non-negative map for display; resized by the caller.
    heatmap: Callable[[Array], Array]
    description: str
    stochastic: bool = False  # needs a key
    needs_tap: bool = False  # takes a Model (layer taps), not just a forward


_METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> None:
    _METHODS[info.name] = info


def list_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_info(name: str) -> MethodInfo:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_METHODS)}") from None
