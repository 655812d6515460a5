"""Faithfulness and segmentation metrics for saliency maps, as compiled, batched JAX programs.

Every metric takes a batch of (image, map, target): NHWC images in [0, 1], maps (b, h, w), targets
None (the clean prediction) or class indices, and a `forward` (a jaxattr Model or any pytree
callable images -> logits). Perturbed images are built and scored on the device a chunk of curve
points at a time; `devices=` splits the batch over devices with the same result. Rows whose map or
image holds NaN/inf come back NaN with `valid` False; the others are unaffected.

* `rise_deletion`, `rise_insertion`: the RISE convention (metrics.md §1);
* `igos_deletion`, `igos_insertion`: the I-GOS convention on low-resolution masks (§2);
* `perturbation_curves`, `confidence_change`: BEE's POS/NEG, DEL/INS, ADP/PIC/ADD (§4);
* `segmentation_scores` + `segmentation.init/update/result`: IIA's pixel accuracy, mIoU, mAP, mF1 (§5).

`mean_colour(model)` is the fill colour "zero in normalised space" of a jaxattr Model.
"""

from jaxattr.metrics import segmentation as segmentation
from jaxattr.metrics._common import DEFAULT_CHUNK as DEFAULT_CHUNK, mean_colour as mean_colour
from jaxattr.metrics.deletion_insertion import (
    RISE_STEPS as RISE_STEPS,
    IgosCurves as IgosCurves,
    RiseCurves as RiseCurves,
    igos_deletion as igos_deletion,
    igos_insertion as igos_insertion,
    rise_blur as rise_blur,
    rise_deletion as rise_deletion,
    rise_insertion as rise_insertion,
    rise_kernel as rise_kernel,
)
from jaxattr.metrics.perturbation import (
    ConfidenceChange as ConfidenceChange,
    PerturbationCurves as PerturbationCurves,
    confidence_change as confidence_change,
    perturbation_curves as perturbation_curves,
)
from jaxattr.metrics.segmentation import (
    SegmentationScores as SegmentationScores,
    SegmentationTotals as SegmentationTotals,
    binary_mask as binary_mask,
    segmentation_scores as segmentation_scores,
)
