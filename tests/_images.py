"""Small random photographs for the command-line tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_images(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`folder` (created) holding im0.png ... im<count-1>.png: uniform noise of (height, width), seed 0."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder
