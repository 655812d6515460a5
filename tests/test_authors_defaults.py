"""Each method's defaults, written here as literals from the code of the method's authors (or of the
library jaxattr follows), so that a changed default fails a test even where the PyTorch reference
twin would follow it. Where jaxattr deliberately differs, the case says so and why.

Sources: IGOS_pp @ b0820a2 (main.py command-line defaults, methods.py); IG2's ig2.py `GetMask`
signature; IIA's cnn_saliency_map_generator.py and vit_saliency_map_generator.py; GNL's main.py
(captum 0.2.0 IntegratedGradients); RISE @ d91ea00 evaluation.py and Evaluation.ipynb; PAIR
saliency 0.2.1 (GuidedIG, BlurIG, SmoothGrad); captum 0.9 IntegratedGradients.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxattr.methods import method_spec
from jaxattr.methods.iia import CNN_STEPS, VIT_STEPS, path_block, path_nodes
from jaxattr.metrics import RISE_STEPS, rise_kernel


def _defaults(method: str) -> dict:
    return method_spec(method).config().to_dict()


IGOS_COMMON = {
    "iterations": 20,  # main.py --ig_iter 20, passed as the iteration count T (main.py:71-72)
    "steps": 15,  # main.py --iterations 15, passed as the integration steps N
    "mask_size": 28,  # --size 28
    "l1": 1.0,  # --L1 1
    "l2": 20.0,  # --L2 20
    "alpha0": 1000.0,  # --alpha 1000 (the I-GOS function default 8 is never reached from main.py)
    "noise": 0.2,  # hard-coded noise std in normalised space
    "optimizer": "ls",  # --opt is never forwarded: the Armijo line search always runs
    "armijo": 1e-4,  # hard-coded line-search constants: beta 1e-4,
    "decay": 0.2,  # step decay 0.2,
    "min_step": 1e-5,  # and the smallest step 1e-5
    "blur_kernel": None,  # None: the kernel the reference picks for the input size
    "chunk": None,  # memory only
}


@pytest.mark.parametrize("method", ["igos", "igos_plus", "igos_pp"])
def test_igos_defaults_are_the_igos_pp_command_lines(method):
    expected = dict(IGOS_COMMON)
    if method != "igos":
        expected["btv_sigma"] = 0.01  # bilateral TV's sigma, hard-coded (I-GOS itself uses plain TV)
    assert _defaults(method) == expected


def test_ig2_defaults_are_getmasks_signature():
    assert _defaults("ig2") == {
        "steps": 201,  # GetMask(..., steps=201,
        "step_size": 256.0,  # step_size=256.0,
        "clip_min": 0.0,  # clip_min_max=[0, 255])
        "clip_max": 255.0,
        "value_scale": 255.0,  # the path in raw [0, 255] units, as the reference's inputs are
        "gradient_space": "normalized",  # the notebooks' callback: gradients of the normalised input
        "layer": None,  # the model's representation layer
        "output": "logit",
        "chunk": 1,  # memory only
        "selection": "other_class",  # the notebooks draw references predicted as another class
        "relevant_classes": 4,  # the "relevant reference" trick: the top-2 to top-4 predicted classes
        "num_references": 8,  # n_reference = 8 in the ImageNet notebook
        "reference": "black",  # without references: a black image (the GradCF degenerate case)
    }


def test_iia_defaults_are_the_generator_scripts():
    assert _defaults("iia") == {
        "layer": None,  # CNN: the model's feature layer (ResNet layer4); ViT: the last block
        "steps": None,  # None: by family, below
        "mode": "reference",
        "activation_steps": None,
        "chunk": None,
        "output": "logit",
    }
    assert CNN_STEPS == 10  # INTERPOLATION_STEPS = 10 in cnn_saliency_map_generator.py: 11 points a path
    assert VIT_STEPS == 5  # ITERATION_STEPS = 5 in vit_saliency_map_generator.py: 6 points a path
    np.testing.assert_array_equal(path_nodes(10), np.linspace(0, 1, 11, dtype=np.float32))
    sites = tuple(f"block{i}.attention" for i in range(12))
    assert path_block(None, sites, None) == 11  # the override replaces the last block's attention (block 11)


def test_gnl_ig_defaults_are_gnls_main():
    assert _defaults("gnl_ig") == {
        "steps": 50,  # captum 0.2.0 attribute(n_steps=50,
        "rule": "gausslegendre",  # method='gausslegendre')
        "baseline": "mean",  # baseline None: 0 in normalised space, the ImageNet mean colour in pixels
        "chunk": "auto",
        "output": "logit",
        "blur_sigma": 50.0,  # used by the 'blur' baseline only
    }
    # GNL divides |sum_c a| by its maximum; jaxattr's picture clips at the 99th percentile instead,
    # deliberately: on a real model the raw maximum is one dot and the rest of the map is black.
    contrast = method_spec("gnl_ig").contrast
    assert (contrast.floor, contrast.percentile) == ("zero", 99.0)


def test_captum_and_pair_defaults_where_jaxattr_follows_them():
    assert _defaults("integrated_gradients") == {
        "steps": 50,  # captum IntegratedGradients.attribute(n_steps=50,
        "rule": "gausslegendre",  # method='gausslegendre',
        "baseline": "black",  # baselines=None: zeros of the input, black pixels)
        "chunk": "auto",
        "output": "logit",
        "blur_sigma": 50.0,
    }
    assert _defaults("guided_ig") == {"steps": 200, "fraction": 0.25, "max_dist": 0.02, "baseline": "black", "output": "logit"}  # PAIR GuidedIG
    assert _defaults("blur_ig") == {"max_sigma": 50.0, "steps": 100, "grad_step": 0.01, "sqrt": False, "chunk": "auto", "output": "logit"}  # PAIR BlurIG
    smoothgrad = _defaults("smoothgrad")
    # PAIR's SmoothGrad: stdev_spread=0.15 of the input's range, nsamples=25 (captum's NoiseTunnel
    # takes 5 samples of an absolute stdev; jaxattr follows PAIR).
    assert {k: smoothgrad[k] for k in ("kind", "samples", "stdev", "relative")} == {"kind": "smoothgrad", "samples": 25, "stdev": 0.15, "relative": True}
    assert smoothgrad["base"]["method"] == "saliency"
    assert _defaults("gradcam") == {"layer": None, "output": "logit", "relu": True}  # captum LayerGradCam relu_attributions, as Grad-CAM's paper


def test_rise_evaluation_settings():
    assert RISE_STEPS == {"single": 224, "batched": 1792}  # 224 px a step per image; 224 * 8 in the batched notebook cell
    # SciPy gaussian_filter1d of an 11-tap delta, sigma 5, reflected tails: flatter than a Gaussian;
    # the 2-D kernel is its outer product (centre 0.008833, corner 0.007737).
    k1 = rise_kernel()
    np.testing.assert_allclose(k1, [0.08795815, 0.08889612, 0.0904742, 0.09219112, 0.09348939, 0.09398206,
                                    0.09348939, 0.09219112, 0.0904742, 0.08889612, 0.08795815], rtol=1e-6)
    np.testing.assert_allclose([k1[5] ** 2, k1[0] ** 2], [0.008833, 0.007737], atol=5e-7)
