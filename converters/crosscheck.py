"""jaxattr vs its PyTorch reference on the same inputs: one runner per method.

A runner is registered per method and returns (jaxattr attributions, reference attributions)
as numpy arrays of the same shape. The parity tests and `jaxattr crosscheck` both call these
runners, so what the user checks is what CI checks.

max_rel_diff = max |jaxattr - reference| / max |reference|.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import torch

from converters.torch_models import PixelInput, to_torch, torch_twin
from jaxattr.models import Model, create_model

Runner = Callable[..., tuple[np.ndarray, np.ndarray]]
# runner(model: Model, torch_model: PixelInput, images: np.ndarray, targets: np.ndarray) -> (ours, reference)
# Both models, the images and the computation are in the requested dtype.


@dataclasses.dataclass(frozen=True)
class Reference:
    method: str
    runner: Runner
    reference: str  # what it is compared with, e.g. "captum IntegratedGradients (gausslegendre)"
    tolerance: dict[str, float]  # dtype name -> max_rel_diff allowed
    default_dtype: str = "float32"  # float64 where float32 comparisons are chaotic (see each runner)
    # The config the runner compares at when given none, where that is not the method's defaults
    # (settings the reference does not have); `jaxattr crosscheck --option` changes fields of it.
    config: Any = None


_REFERENCES: dict[str, Reference] = {}


def reference(
    method: str, *, reference: str, tolerance: dict[str, float], default_dtype: str = "float32", config: Any = None
):
    """Decorator registering a runner for `method`."""

    def wrap(runner: Runner) -> Runner:
        if method in _REFERENCES:
            raise ValueError(f"a reference for {method!r} is already registered ({_REFERENCES[method].reference})")
        _REFERENCES[method] = Reference(method, runner, reference, tolerance, default_dtype, config)
        return runner

    return wrap


def changed(config: Any, defaults: Any, names: dict[str, str]) -> dict[str, Any]:
    """{reference argument: value} for each config field (`names`: argument -> field) the caller set
    away from jaxattr's `defaults`. A reference is given only these and otherwise runs at its own
    defaults, so a jaxattr default that drifts from the reference's fails the comparison."""
    return {argument: getattr(config, field) for argument, field in names.items() if getattr(config, field) != getattr(defaults, field)}


def references() -> dict[str, Reference]:
    import converters.references  # noqa: F401  (registers the runners)

    return dict(_REFERENCES)


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: jaxattr {ours.shape}, reference {ref.shape}")
    scale = np.abs(ref).max()
    return float(np.abs(ours - ref).max() / (scale if scale > 0 else 1.0))


def fraction_off(ours: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    """The fraction of entries differing by more than tolerance x max |reference|.

    float32 comparisons on ReLU / max-pool networks: where a unit's input lies within float32
    rounding of its kink, torch's and XLA's convolutions (which round differently, and differently
    on different CPUs) can take opposite sides and that unit's gradient differs, locally. Such a
    flip moves a few entries by per cent while everything else agrees to rounding; this measures
    the agreement everywhere else."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: jaxattr {ours.shape}, reference {ref.shape}")
    scale = np.abs(ref).max()
    return float(np.mean(np.abs(ours - ref) > tolerance * (scale if scale > 0 else 1.0)))


@contextlib.contextmanager
def precision(dtype: str):
    """float64 runs need JAX's x64 mode; torch follows the tensors' dtype."""
    if dtype == "float64":
        with jax.enable_x64(True):
            yield np.float64
    elif dtype == "float32":
        yield np.float32
    else:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")


def _cast_weights(torch_model: PixelInput, dtype: torch.dtype) -> PixelInput:
    """A copy in `dtype`; the caller's model is left as it was."""
    return copy.deepcopy(torch_model).to(dtype)


@dataclasses.dataclass(frozen=True)
class CrossCheckResult:
    method: str
    model: str
    dtype: str
    max_rel_diff: float
    tolerance: float
    reference: str

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_diff <= self.tolerance)


def twin_models(
    model_name: str, *, random_init: bool, seed: int = 0, weights: str = "pretrained"
) -> tuple[Model, PixelInput]:
    """The jaxattr model and its torch twin with identical weights: random (from `seed`), or
    `weights` as `create_model` resolves them ("pretrained" or a file path)."""
    if random_init:
        torch_model, model = torch_twin(model_name, seed=seed)
        return model, torch_model
    model = create_model(model_name, weights)
    return model, PixelInput(to_torch(model), model.module.mean, model.module.std).eval()


def run(
    method: str,
    model: Model,
    torch_model: PixelInput,
    images: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    dtype: str | None = None,
    **options,
) -> CrossCheckResult:
    """Cross-check `method` on `images` (NHWC in [0, 1]); targets default to torch's predictions.

    `options` go to the runner (e.g. `config=` for methods whose runner takes one)."""
    ref = references().get(method)
    if ref is None:
        raise ValueError(f"no PyTorch reference for {method!r}; cross-checkable: {', '.join(references())}")
    dtype = dtype or ref.default_dtype
    if dtype not in ref.tolerance:
        raise ValueError(f"{method} is cross-checked in {', '.join(ref.tolerance)}, not {dtype}")
    with precision(dtype) as np_dtype:
        images = np.asarray(images, np_dtype)
        torch_model = _cast_weights(torch_model, torch.float64 if dtype == "float64" else torch.float32)
        model = model.astype(np_dtype)
        if targets is None:
            with torch.no_grad():
                targets = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).argmax(-1).numpy()
        ours, theirs = ref.runner(model, torch_model, images, np.asarray(targets), **options)
    return CrossCheckResult(method, model.name, dtype, max_rel_diff(ours, theirs), ref.tolerance[dtype], ref.reference)
