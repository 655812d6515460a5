"""Data shipped with jaxattr: the ImageNet-1k class names, available offline.

`imagenet_classes.txt` holds one name per line in class-index order. It was generated once from
torchvision's `torchvision.models._meta._IMAGENET_CATEGORIES` (the names torchvision shows for its
ImageNet weights), so labels match what torchvision and timm users see.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names; `imagenet_labels()[i]` names class index i."""
    text = resources.files(__name__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())
