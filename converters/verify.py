"""Layer-by-layer parity of a jaxattr model and its torch twin on the same images."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import torch

from converters.torch_models import PixelInput, to_torch_images
from jaxattr.models import Model

LOGIT_RTOL = 1e-4  # max |diff| relative to max |logit|
ACTIVATION_RTOL = 1e-3  # max |diff| relative to max(1, max |activation|)


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    layer: str
    max_abs_diff: float
    scale: float
    tolerance: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / self.scale

    @property
    def ok(self) -> bool:
        return self.relative <= self.tolerance


@dataclasses.dataclass(frozen=True)
class ParityReport:
    model: str
    layers: tuple[LayerDiff, ...]  # the logits are the last entry, named "logits"
    skipped: tuple[str, ...]  # jaxattr layers with no torch module of the same name

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.layers)

    @property
    def logits(self) -> LayerDiff:
        return self.layers[-1]

    def table(self) -> str:
        rows = [f"{'layer':<40} {'max|diff|':>12} {'scale':>12} {'relative':>10} {'tol':>8}  ok"]
        for d in self.layers:
            rows.append(
                f"{d.layer:<40} {d.max_abs_diff:12.3e} {d.scale:12.3e} {d.relative:10.2e} {d.tolerance:8.0e}  {'yes' if d.ok else 'NO'}"
            )
        if self.skipped:
            rows.append(f"(no torch module of the same name: {', '.join(self.skipped)})")
        return "\n".join(rows)


def _as_nhwc(output: torch.Tensor) -> np.ndarray:
    array = output.detach().cpu().numpy().copy()  # in-place ReLUs overwrite the output later
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def compare(model: Model, torch_model: PixelInput, images: np.ndarray) -> ParityReport:
    """Run both models on `images` (NHWC, [0, 1]) and compare every same-named layer and the logits."""
    captured: dict[str, np.ndarray] = {}
    handles, skipped = [], []
    modules = dict(torch_model.model.named_modules())
    for layer in model.layers:
        if layer not in modules:
            skipped.append(layer)
            continue
        handles.append(
            modules[layer].register_forward_hook(
                lambda _m, _i, out, layer=layer: captured.__setitem__(layer, _as_nhwc(out)) if torch.is_tensor(out) else None
            )
        )
    try:
        with torch.no_grad():
            torch_logits = torch_model(to_torch_images(images)).numpy()
    finally:
        for handle in handles:
            handle.remove()
    logits, activations = jax.jit(lambda m, x: m.activations(x))(model, images)
    diffs = []
    for layer in model.layers:
        if layer in captured and layer in activations:
            ref, got = captured[layer], np.asarray(activations[layer])
            if ref.shape != got.shape:
                raise ValueError(f"{model.name} layer {layer}: torch shape {ref.shape}, jaxattr shape {got.shape}")
            diffs.append(LayerDiff(layer, float(np.abs(ref - got).max()), max(1.0, float(np.abs(ref).max())), ACTIVATION_RTOL))
    logits = np.asarray(logits)
    diffs.append(LayerDiff("logits", float(np.abs(torch_logits - logits).max()), float(np.abs(torch_logits).max()) or 1.0, LOGIT_RTOL))
    return ParityReport(model.name, tuple(diffs), tuple(skipped))
