"""Integrated Gradients (Sundararajan et al., 2017) and GNL-IG (Kwon et al., ICPR 2020).

Both are the straight-line path integral of `jaxattr.paths`:
    IG(x) = (x - x') ⊙ Σ_k w_k ∇score(x' + t_k (x - x')).
GNL-IG is the same integral on the model whose ReLU / ReLU6 / max-pool backward rules are the
guided ones (gnl.md §2.4): only the gradients change, so it satisfies no completeness.

Precision: computation in the images' dtype (float64 with x64 enabled). The captum rules' weights
are the float32 values modern captum multiplies by; captum 0.2.0, which GNL pins, kept float64
Gauss-Legendre weights (a ~1e-8 relative difference, visible only in float64).
"""

from __future__ import annotations

import dataclasses
import functools

from jaxtyping import Array, Float

from jaxattr import heatmaps, paths
from jaxattr.methods._common import OUTPUTS, Output, attribution_method, resolve_targets
from jaxattr.methods.registry import MethodInfo, register_method
from jaxattr.models import Model


@dataclasses.dataclass(frozen=True)
class IntegratedGradientsConfig:
    """captum `IntegratedGradients.attribute` defaults."""

    steps: int = 50  # captum n_steps
    rule: str = "gausslegendre"  # one of jaxattr.paths.RULES (captum's method names, 'pair', 'igos')
    baseline: str = "black"  # one of jaxattr.paths.BASELINES; a `baselines=` array overrides it
    # Steps evaluated per gradient batch: memory, never results (captum's internal_batch_size /
    # batch size). None: all steps at once.
    chunk: int | None = None
    output: Output = "logit"  # differentiate the target's logit or its softmax probability
    blur_sigma: float = 50.0  # sigma of the 'blur' baseline (Blur IG's max_sigma)

    def __post_init__(self):
        paths.check_rule(self.rule, self.steps)
        paths.check_baseline(self.baseline)
        paths.check_chunk(self.chunk)
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; expected one of {OUTPUTS}")


@dataclasses.dataclass(frozen=True)
class GnlIGConfig(IntegratedGradientsConfig):
    """GNL's settings (gnl.md §2.5): 50 Gauss-Legendre nodes, the logit, and captum's zero baseline
    on normalised inputs, which in pixel space is the model's mean colour."""

    baseline: str = "mean"


def _straight_line_ig(forward, images, targets, key, config: IntegratedGradientsConfig, baselines):
    targets = resolve_targets(forward, images, targets)
    if baselines is None:
        baselines = paths.baseline_images(config.baseline, forward, images, key=key, blur_sigma=config.blur_sigma)
    path = paths.StraightLine(paths.broadcast_baselines(baselines, images), images)
    rule = paths.quadrature(config.rule, config.steps)
    return paths.integrate(forward, path, targets, rule, output=config.output, chunk=config.chunk)


@attribution_method(IntegratedGradientsConfig)
def integrated_gradients(
    forward, images, targets, key, *, config: IntegratedGradientsConfig, baselines=None
) -> Float[Array, "b h w c"]:
    """Integrated Gradients of each image's target (default: its predicted class).

    `baselines`: an optional array broadcastable to the images (per image, one image, a colour);
    otherwise `config.baseline` names one ('uniform' needs `key`)."""
    return _straight_line_ig(forward, images, targets, key, config, baselines)


@attribution_method(GnlIGConfig)
def gnl_ig(forward, images, targets, key, *, config: GnlIGConfig, baselines=None) -> Float[Array, "b h w c"]:
    """Integrated Gradients with Guided Non-Linearity: IG on `forward.with_nonlinearity("guided")`.

    Targets default to the predicted class (the guided rules leave the forward pass unchanged)."""
    if not isinstance(forward, Model):
        raise TypeError(
            f"gnl_ig switches the model's ReLU/max-pool backward rules: pass a jaxattr Model, "
            f"got {type(forward).__name__}"
        )
    return _straight_line_ig(forward.with_nonlinearity("guided"), images, targets, key, config, baselines)


register_method(
    MethodInfo(
        "integrated_gradients",
        integrated_gradients,
        IntegratedGradientsConfig,
        heatmaps.grayscale,
        "path integral of the gradient from a baseline to the image (captum defaults)",
    )
)
register_method(
    MethodInfo(
        "gnl_ig",
        gnl_ig,
        GnlIGConfig,
        # GNL's |sum_c a| with display contrast; GNL's own map is heatmaps.abs_channel_sum(a).
        functools.partial(heatmaps.abs_channel_sum, percentile=99.0),
        "Integrated Gradients with guided ReLU/max-pool backward rules (GNL)",
    )
)
