"""An independent PyTorch implementation of IG2 (ig2_and_pair.md Part A), written from the spec with
the authors' structure: one explicand at a time, its references as one batch, a NumPy loop of
`steps` GradPath steps, each a callback into PyTorch, then `steps` output-gradient callbacks.

The callback is the ImageNet notebook's: path points arrive in raw units (value_scale x pixels,
[0, 255]); the model input is the leaf tensor after /value_scale and the model's (x - mean) / std
('normalized', the notebooks' space) or the raw tensor itself ('input'); the representation is the
input of the model's final `nn.Linear`, read by a forward hook; the distance is torch's MSELoss over
the whole batch of representations and its gradient comes from `loss.backward()`, which, as in the
notebooks, computes the weight gradients too. A zero gradient norm gives NaN, as in the reference.

Tests, `jaxattr crosscheck ig2` and benchmarks/ig2.py all use this one implementation.
"""

from __future__ import annotations

import numpy as np
import torch

from converters.crosscheck import reference
from converters.torch_models import PixelInput
from jaxattr.methods.ig2 import IG2Config, ig2


class Callback:
    """The notebooks' `call_model_function` for one explicand's target, on a PixelInput model."""

    def __init__(self, torch_model: PixelInput, target: int, *, space: str, output: str, value_scale: float):
        if space not in ("normalized", "input"):
            raise ValueError(f"unknown gradient space {space!r}")
        self.model, self.target, self.space, self.output = torch_model, int(target), space, output
        self.value_scale = value_scale
        linears = [m for m in torch_model.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("the reference reads the input of the model's final nn.Linear; this model has none")
        self._captured: list[torch.Tensor] = []
        self._hook = linears[-1].register_forward_hook(lambda module, inputs, out: self._captured.append(inputs[0]))

    def close(self) -> None:
        self._hook.remove()

    def _forward(self, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(leaf, logits, representation) for NHWC raw points."""
        self._captured.clear()
        x = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 3, 1, 2)))
        if self.space == "normalized":
            mean, std = self.model.normalisation(x.dtype)
            leaf = ((x / self.value_scale - mean) / std).requires_grad_(True)
            logits = self.model.model(leaf)
        else:
            leaf = x.requires_grad_(True)
            logits = self.model(leaf / self.value_scale)
        return leaf, logits, self._captured[-1]

    def representations(self, raw: np.ndarray) -> torch.Tensor:
        """REP_LAYER_VALUES: the references' representations, kept as constants."""
        return self._forward(raw)[2].detach()

    def distance_gradients(self, raw: np.ndarray, layer_baseline: torch.Tensor) -> tuple[np.ndarray, float]:
        """REP_DISTANCE_GRADIENTS: d(-MSE(rep, layer_baseline)) / d leaf, NHWC, and the loss."""
        leaf, _, rep = self._forward(raw)
        loss = -torch.nn.functional.mse_loss(rep, layer_baseline)
        loss.backward()
        gradients = leaf.grad.detach().numpy().transpose(0, 2, 3, 1)
        self.model.zero_grad(set_to_none=True)
        return gradients, float(loss.detach())

    def output_gradients(self, raw: np.ndarray) -> np.ndarray:
        """INPUT_OUTPUT_GRADIENTS: d y / d leaf, y the target's logit (or probability), NHWC."""
        leaf, logits, _ = self._forward(raw)
        scores = torch.softmax(logits, dim=-1) if self.output == "probability" else logits
        outputs = scores[:, self.target]
        (gradients,) = torch.autograd.grad(outputs, leaf, grad_outputs=torch.ones_like(outputs))
        return gradients.detach().numpy().transpose(0, 2, 3, 1)


def unit_by_l2_norm(x: np.ndarray) -> np.ndarray:
    """Each sample divided by its L2 norm over all its elements; no epsilon (0/0 is NaN)."""
    norms = np.sqrt(np.sum(np.abs(x) ** 2, axis=tuple(range(1, x.ndim))))
    return x / norms.reshape(-1, *([1] * (x.ndim - 1)))


def reference_gradpath(callback: Callback, explicand: np.ndarray, references: np.ndarray, *, steps: int,
                       step_size: float, clip: tuple[float, float]) -> list[np.ndarray]:
    """The GradPath of one explicand (h, w, 3) towards each of its references (B, h, w, 3), raw
    units: steps + 1 arrays (B, h, w, 3), the first the explicand repeated."""
    start = np.repeat(explicand[None], len(references), axis=0)
    layer_baseline = callback.representations(references)
    delta = np.zeros_like(start)
    path = [start]
    for _ in range(steps):
        gradients, _ = callback.distance_gradients(start + delta, layer_baseline)
        delta = delta + unit_by_l2_norm(gradients) * step_size
        delta = np.clip(start + delta, clip[0], clip[1]) - start
        path.append(start + delta)
    return path


def reference_ig2(callback: Callback, explicand: np.ndarray, references: np.ndarray, *, steps: int,
                  step_size: float, clip: tuple[float, float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(IG2 mask (h, w, 3), GradPath): Σ_i (p_i - p_{i+1}) ⊙ ∇y(p_i), averaged over the references."""
    path = reference_gradpath(callback, explicand, references, steps=steps, step_size=step_size, clip=clip)
    attributions = np.zeros_like(path[0])
    for before, after in zip(path[:-1], path[1:]):
        attributions += (before - after) * callback.output_gradients(before)
    return attributions.mean(axis=0), path


# The reference's own settings (ig2_and_pair.md A.1, A.5), not jaxattr's: GetMask(x_value, baselines,
# call_model_function, call_model_args=None, steps=201, step_size=256.0, clip_min_max=[0, 255])
# (ig2.py:71-79), on raw [0, 255] images, with the notebooks' callback (gradients of the normalised
# input, the target's logit).
STEPS = 201
STEP_SIZE = 256.0
CLIP = (0.0, 255.0)
VALUE_SCALE = 255.0
GRADIENT_SPACE = "normalized"
OUTPUT = "logit"


def run_reference(torch_model: PixelInput, images: np.ndarray, references: np.ndarray, targets: np.ndarray, *,
                  steps: int = STEPS, step_size: float = STEP_SIZE, clip: tuple[float, float] = CLIP,
                  value_scale: float = VALUE_SCALE, space: str = GRADIENT_SPACE, output: str = OUTPUT,
                  ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """The reference on pixel images (b, h, w, 3) and references per explicand (b, r, h, w, 3):
    (masks (b, h, w, 3), per explicand its raw GradPath). One explicand at a time, as the authors
    run it."""
    masks, gradpaths = [], []
    for image, refs, target in zip(images, references, targets):
        callback = Callback(torch_model, int(target), space=space, output=output, value_scale=value_scale)
        try:
            mask, path = reference_ig2(callback, image * value_scale, refs * value_scale, steps=steps, step_size=step_size, clip=clip)
        finally:
            callback.close()
        masks.append(mask)
        gradpaths.append(path)
    return np.stack(masks), gradpaths


def reference_options(config: IG2Config) -> dict:
    """`run_reference`'s settings equal to a jaxattr config's (to compare at settings other than
    each side's defaults)."""
    return dict(steps=config.steps, step_size=config.step_size, clip=(config.clip_min, config.clip_max),
                value_scale=config.value_scale, space=config.gradient_space, output=config.output)


def default_references(images: np.ndarray) -> np.ndarray:
    """Per explicand, the other images of the batch (its mirror image when it is alone)."""
    if len(images) == 1:
        return images[:, None, :, ::-1]
    return np.stack([np.delete(images, i, axis=0) for i in range(len(images))])


def check_config(config: IG2Config, references: np.ndarray) -> None:
    if config.selection != "all" or (config.num_references is not None and config.num_references < references.shape[1]):
        raise ValueError("the reference uses every reference it is given: compare with selection='all', num_references=None")
    if config.layer is not None:
        raise ValueError("the reference reads the input of the final nn.Linear: compare with layer=None")


COMPARED = IG2Config(selection="all", num_references=None)  # every reference given, as the reference


# float64 by default: fixed-length normalised steps never converge, so float32 differences between
# torch and XLA grow along the path (spec §2.4); float64 agrees to ~1e-12.
@reference(
    "ig2",
    reference="independent PyTorch IG2 loop (the authors' GetMask structure with the notebooks' callback; "
    "references: the batch's other images)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
    default_dtype="float64",
    config=COMPARED,
)
def ig2_vs_reference(model, torch_model, images, targets, *, config: IG2Config | None = None, references=None):
    """jaxattr at `config` (default: its defaults, with every reference used) against the reference
    at the same values (default: the reference's own)."""
    references = default_references(images) if references is None else np.asarray(references, images.dtype)
    check_config(config or COMPARED, references)
    ours = ig2(model, images, targets, references=references, config=config or COMPARED)
    theirs, _ = run_reference(torch_model, images, references, targets, **({} if config is None else reference_options(config)))
    return np.asarray(ours), theirs
