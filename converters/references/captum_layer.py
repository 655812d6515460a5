"""captum references for Grad-CAM and guided backpropagation."""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import GuidedBackprop, LayerGradCam

from converters.crosscheck import reference
from converters.torch_models import to_numpy_nhwc, to_torch_images
from jaxattr.methods.gradcam import GradCamConfig, gradcam
from jaxattr.methods.guided_backprop import guided_backprop


@reference(
    "gradcam",
    reference="captum LayerGradCam (relu_attributions=True) at the same layer",
    tolerance={"float32": 1e-5, "float64": 1e-10},
)
def gradcam_vs_captum(model, torch_model, images, targets, *, layer: str | None = None):
    layer = layer or model.feature_layer
    ours = gradcam(model, images, targets, config=GradCamConfig(layer=layer))
    cam = LayerGradCam(torch_model, torch_model.model.get_submodule(layer))
    theirs = cam.attribute(to_torch_images(images), target=torch.from_numpy(targets), relu_attributions=True)
    return np.asarray(ours), theirs.detach().numpy()[:, 0]


@reference(
    "guided_backprop",
    reference="captum GuidedBackprop (guided rule on every nn.ReLU)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
)
def guided_backprop_vs_captum(model, torch_model, images, targets):
    ours = guided_backprop(model, images, targets)
    inputs = to_torch_images(images).requires_grad_()  # captum warns when it has to set it
    theirs = GuidedBackprop(torch_model).attribute(inputs, target=torch.from_numpy(targets))
    return np.asarray(ours), to_numpy_nhwc(theirs)
