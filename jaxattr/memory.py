"""Memory estimates, so that a run picks a chunk size that fits the machine, or is refused up front
with the number, instead of being killed by the kernel's OOM killer halfway.

A method's peak memory is dominated by the forward+backward passes it evaluates at once: path
points (Integrated Gradients' steps), noise samples (SmoothGrad), one per image for plain
gradients. Its config says how many per image (`Config.footprint`: passes, plus the arrays its
settings alone size, such as quadrature tables). One pass costs what the forward keeps for its
backward pass -- the residuals of `jax.vjp`, measured per image with `jax.eval_shape` (a trace,
no compilation: batch 2 minus batch 1) -- times `PASS_OVERHEAD` for what XLA holds beside them
(cotangents flowing back, convolution workspace). The factor is calibrated against XLA's own
`memory_analysis()` of compiled programs (tests/test_memory.py checks the estimate bounds it).

    estimate = PARAMS_COPIES x parameters + batch x (passes x pass bytes + IMAGE_COPIES x image)
               + the settings' fixed bytes

`fit(method, model, batch, image_shape)` returns the method unchanged if the estimate fits the
budget (default: `BUDGET_FRACTION` of the memory available now on the device that runs it, or
the environment variable JAXATTR_MEMORY_BUDGET, e.g. "6G", where set),
else the largest `chunk` that fits, for configs whose `chunk` is None ("all at once") or "auto"
(a chunk changes memory, never results) -- SmoothGrad's samples first, then its base method's -- and
raises MemoryEstimateError when even one at a time does not fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr.methods._common import as_forward
from jaxattr.config import AUTO_CHUNK
from jaxattr.methods.base import Method, resolve_chunks

# XLA's memory for a pass over the residuals the pass keeps: measured up to 6.1 (resnet18 at
# 64 px, where convolution workspace dominates small activations); a margin above it.
PASS_OVERHEAD = 8
PARAMS_COPIES = 2  # the parameters and their layout-transformed copies for the backward convolutions
IMAGE_COPIES = 16  # images, attributions, baselines, path state and accumulators per image
BUDGET_FRACTION = 0.8  # of the memory available: the rest for the runtime, compilation and other programs


class MemoryEstimateError(ValueError):
    """The requested computation cannot fit the memory available; the message gives the numbers."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------- what is available


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _host_available() -> int:
    """MemAvailable, bounded by the cgroup's limit (containers) where there is one."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:  # not Linux: total physical memory
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = 8 << 30
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:
            available = min(available, max(cap - used, 0))
    return available


def available_bytes(device: jax.Device | None = None) -> int:
    """Memory free now on `device` (default: the default device): an accelerator's free memory as
    its allocator reports it, the host's available memory for a CPU."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return _host_available()


BUDGET_VARIABLE = "JAXATTR_MEMORY_BUDGET"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'6G', '512M', '1.5T' or a plain number of bytes."""
    number, unit = text.strip().upper().removesuffix("B"), ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 6G, 512M or a number of bytes, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return int(value)


def default_budget(device: jax.Device | None = None) -> int:
    """$JAXATTR_MEMORY_BUDGET if set, else BUDGET_FRACTION of the memory available on `device`."""
    if os.environ.get(BUDGET_VARIABLE):
        try:
            return parse_bytes(os.environ[BUDGET_VARIABLE])
        except ValueError as e:
            raise MemoryEstimateError(f"{BUDGET_VARIABLE}: {e}") from None
    return int(BUDGET_FRACTION * available_bytes(device))


# ---------------------------------------------------------------------------------- estimates


def _nbytes(tree: Any) -> int:
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=64)
def _pass_bytes(treedef, leaves: tuple, image_shape: tuple[int, ...]) -> int:
    def residuals(forward, batch: int) -> Any:
        x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
        return jax.eval_shape(lambda f, y: jax.vjp(lambda z: jnp.sum(f(z)), y)[1], forward, x)

    forward = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    return max(_nbytes(residuals(forward, 2)) - _nbytes(residuals(forward, 1)), 1)


def pass_bytes(model: Any, image_shape: tuple[int, ...], dtype: Any = jnp.float32) -> int:
    """Bytes one forward+backward pass of one image keeps for its backward pass (the residuals of
    jax.vjp) in `dtype`, from a float32 trace scaled to `dtype`: nothing is compiled or allocated."""
    leaves, treedef = jax.tree_util.tree_flatten(as_forward(model))
    signature = tuple(
        (tuple(np.shape(leaf)), "float32" if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else str(jnp.result_type(leaf)))
        for leaf in leaves
    )
    return _pass_bytes(treedef, signature, tuple(image_shape)) * jnp.dtype(dtype).itemsize // 4


@dataclasses.dataclass(frozen=True)
class Estimate:
    """An estimate of a method's peak memory on one batch, and what it is made of."""

    bytes: int
    passes: int  # forward+backward passes per image at once
    batch: int
    image_shape: tuple[int, ...]
    dtype: str
    fixed_bytes: int = 0  # what the settings alone size (quadrature tables, keys), whatever the chunk

    def describe(self) -> str:
        h, w = self.image_shape[:2]
        tables = f", {format_bytes(self.fixed_bytes)} of it for tables its settings size" if 2 * self.fixed_bytes > self.bytes else ""
        return (
            f"about {format_bytes(self.bytes)} ({self.batch} image{'s' if self.batch != 1 else ''} of {h}x{w} "
            f"in {self.dtype}, {self.passes} forward+backward pass{'es' if self.passes != 1 else ''} per image at once{tables})"
        )


def estimate(
    method: Method,
    model: Any,
    batch: int,
    image_shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    *,
    pass_size: int | None = None,
) -> Estimate:
    """Estimated peak memory of `method` on a batch of `batch` images of `image_shape` (h, w, c).
    `pass_size`: `pass_bytes(model, image_shape, dtype)` when the caller has it (a trace saved)."""
    dtype = jnp.dtype(dtype)
    footprint = resolve_chunks(method.config, batch, tuple(image_shape)).footprint(tuple(image_shape))
    image = math.prod(image_shape) * dtype.itemsize
    params = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(as_forward(model))) * dtype.itemsize
    if pass_size is None:
        pass_size = pass_bytes(model, image_shape, dtype)
    per_image = footprint.passes * PASS_OVERHEAD * pass_size + IMAGE_COPIES * image
    total = PARAMS_COPIES * params + batch * per_image + footprint.fixed_bytes
    return Estimate(int(total), footprint.passes, batch, tuple(image_shape), str(dtype), int(footprint.fixed_bytes))


# ------------------------------------------------------------------------------ fitting a chunk


def chunk_fields(method: Method) -> list[tuple[tuple[str, ...], int | None]]:
    """(config path, value) of every `chunk` field, outermost first: SmoothGrad's samples
    ("chunk",), then its base method's steps ("base", "chunk")."""
    found, prefix = [], ()
    while True:
        if hasattr(method.config, "chunk"):
            found.append(((*prefix, "chunk"), method.config.chunk))
        base = getattr(method.config, "base", None)
        if not isinstance(base, Method):
            return found
        method, prefix = base, (*prefix, "base")


def _with(method: Method, path: tuple[str, ...], value: Any) -> Method:
    """`method` with the config field at `path` (through `base` methods) set to `value`."""
    if len(path) == 1:
        return Method(method.spec, method.config.replace(**{path[0]: value}))
    base = getattr(method.config, path[0])
    return Method(method.spec, method.config.replace(**{path[0]: _with(base, path[1:], value)}))


def fit(
    method: Method,
    model: Any,
    batch: int,
    image_shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    *,
    budget: int | None = None,
    pass_size: int | None = None,
) -> Method:
    """`method` with the largest chunk sizes, powers of two, that keep the estimate within `budget`
    (default: `default_budget()`); unchanged if it fits. Only chunks left to jaxattr (None or
    "auto") are chosen, and "auto" ones never grow. Raises MemoryEstimateError if it cannot fit.
    `pass_size` as for `estimate`."""
    budget = default_budget() if budget is None else budget
    if pass_size is None:
        pass_size = pass_bytes(model, image_shape, dtype)
    needs = functools.partial(estimate, pass_size=pass_size)
    needed = needs(method, model, batch, image_shape, dtype)
    if needed.bytes <= budget:
        return method
    free = [path for path, value in chunk_fields(method) if value in (None, AUTO_CHUNK)]
    method = Method(method.spec, resolve_chunks(method.config, batch, tuple(image_shape)))
    for path in free:
        smallest = _with(method, path, 1)
        if needs(smallest, model, batch, image_shape, dtype).bytes > budget:
            method = smallest  # not enough: one at a time here, and look further in
            continue
        # The largest chunk that fits, by bisection (all passes at once is known not to fit).
        low, high = 1, needs(method, model, batch, image_shape, dtype).passes
        while low < high:
            middle = (low + high + 1) // 2
            fits = needs(_with(method, path, middle), model, batch, image_shape, dtype).bytes <= budget
            low, high = (middle, high) if fits else (low, middle - 1)
        # A power of two: a little less free memory than last time gives the same program, which
        # the compile cache then serves, and not a chunk of one less.
        return _with(method, path, 1 << (low.bit_length() - 1))
    final = needs(method, model, batch, image_shape, dtype)
    raise MemoryEstimateError(
        f"{method.spec.name} needs {final.describe()}, more than the {format_bytes(budget)} available"
    )
