"""Saliency maps made visible: display contrast, a colormap, overlays on the image, side-by-side
panels, PNG files.

Display contrast lives here and only here (`contrast`): saliency maps stay unclipped everywhere
else, so metrics never depend on how a picture was scaled. Everything is numpy on the host (it
runs once per image, after the device work) and needs nothing beyond Pillow: the colormap is
Turbo, evaluated from its published polynomial.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from jaxtyping import Float, UInt8
from PIL import Image

from jaxattr.maps import Contrast

# Turbo (Anton Mikhailov, Google, 2019), as the degree-5 polynomial fit by Ruofei Du,
# https://gist.github.com/mikhailov-work/0d177465a8151eb6ede1768d51d476c7
# Copyright 2019 Google LLC, Apache-2.0. Row k holds the coefficients of x**k for (r, g, b).
_TURBO_COEFFICIENTS = np.array(
    [
        [0.13572138, 0.09140261, 0.10667330],
        [4.61539260, 2.19418839, 12.64194608],
        [-42.66032258, 4.84296658, -60.58204836],
        [132.13108234, -14.18503333, 110.36276771],
        [-152.94239396, 4.27729857, -89.90310912],
        [59.28637943, 2.82956604, 27.34824973],
    ],
    dtype=np.float64,
)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den > 0, else 0: a constant map shows as zeros, not the references' 0/0 NaN."""
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.zeros_like(num))


def contrast(maps: Float[np.ndarray, "*b h w"], scale: Contrast) -> Float[np.ndarray, "*b h w"]:
    """Saliency maps (one, or a batch) scaled to [0, 1] for display: (m - floor) / (upper - floor),
    clipped, per map (see `jaxattr.maps.Contrast`)."""
    maps = np.asarray(maps)
    axes = (-2, -1)
    upper = np.percentile(maps, scale.percentile, axis=axes, keepdims=True)
    floor = np.min(maps, axis=axes, keepdims=True) if scale.floor == "min" else np.zeros_like(upper)
    return np.clip(_safe_ratio(maps - floor, upper - floor), 0.0, 1.0).astype(np.float32)


def diverging(maps: Float[np.ndarray, "*b h w"], percentile: float = 99.0) -> Float[np.ndarray, "*b h w"]:
    """PAIR `VisualizeImageDiverging` of signed maps (`jaxattr.maps.channel_sum`): 0 -> 0.5 and
    +-span -> 1 / 0, span the `percentile`-th percentile of the map. As in the reference code,
    values below -span go negative (down to -1)."""
    maps = np.asarray(maps)
    span = np.abs(np.percentile(maps, percentile, axis=(-2, -1), keepdims=True))
    return np.clip(_safe_ratio(maps + span, 2 * span), -1.0, 1.0).astype(np.float32)


def turbo(values: Float[np.ndarray, "*shape"]) -> Float[np.ndarray, "*shape 3"]:
    """Turbo colours (float32 RGB in [0, 1]) of values in [0, 1]: dark blue, cyan, green, yellow,
    red. Values outside [0, 1] are clipped (PAIR's diverging maps reach -1)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("cannot colour a heatmap holding NaN or inf")
    x = np.clip(values, 0.0, 1.0)[..., None]
    powers = x ** np.arange(len(_TURBO_COEFFICIENTS))
    return np.clip(powers @ _TURBO_COEFFICIENTS, 0.0, 1.0).astype(np.float32)


def resize_heatmap(heatmap: Float[np.ndarray, "h w"], shape: tuple[int, int]) -> Float[np.ndarray, "H W"]:
    """`heatmap` bilinearly resized to `shape` (height, width)."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"expected a 2-D heatmap (height, width), got shape {heatmap.shape}")
    if heatmap.shape == tuple(shape):
        return heatmap
    resized = Image.fromarray(heatmap).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (height, width, 3) in [0, 1], got shape {image.shape}")
    return image


def colorize(heatmap: Float[np.ndarray, "h w"], shape: tuple[int, int]) -> Float[np.ndarray, "H W 3"]:
    """`heatmap` in Turbo colours at `shape` (height, width)."""
    return turbo(resize_heatmap(heatmap, shape))


# Opacity of the hottest pixels; pixel attributions are sparse, so lower values hide them.
OVERLAY_ALPHA = 0.8


def overlay(
    image: Float[np.ndarray, "h w 3"], heatmap: Float[np.ndarray, "hh ww"], alpha: float = OVERLAY_ALPHA
) -> Float[np.ndarray, "h w 3"]:
    """The coloured heatmap, resized to the image, blended over it with opacity alpha * heat:
    (1 - w) * image + w * turbo(heatmap), w = alpha * heatmap. Where the map is low the photo
    shows unchanged, so the salient regions stand out instead of the whole image turning blue."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = _check_image(image)
    heat = resize_heatmap(heatmap, image.shape[:2])
    weight = alpha * np.clip(heat, 0.0, 1.0)[..., None]
    return (1 - weight) * image + weight * turbo(heat)


def panel(
    image: Float[np.ndarray, "h w 3"],
    heatmap: Float[np.ndarray, "hh ww"],
    alpha: float = OVERLAY_ALPHA,
    gap: int = 4,
) -> Float[np.ndarray, "h w3 3"]:
    """image | coloured heatmap | overlay, side by side, separated by `gap` white columns."""
    image = _check_image(image)
    spacer = np.ones((image.shape[0], gap, 3), np.float32)
    tiles = [image, spacer, colorize(heatmap, image.shape[:2]), spacer, overlay(image, heatmap, alpha)]
    return np.concatenate(tiles, axis=1)


def to_uint8(image: Float[np.ndarray, "h w 3"]) -> UInt8[np.ndarray, "h w 3"]:
    """float RGB in [0, 1] -> 8-bit RGB, rounded (values outside [0, 1] are clipped)."""
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(file)` writes, all or nothing: the bytes go to a
    hidden temporary file in the same directory, which is renamed over `path` once complete.
    A crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # see _TEMPORARY
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")  # write_atomically's temporary names: .<name>.<pid>.tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a process id
        return False
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporary files `write_atomically` left in `directory` when its process was killed
    (kill -9 skips the cleanup): those whose process is gone. A live process's temporaries (a
    concurrent run writing into the same directory) are left alone."""
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry.name)
            if match and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def save_png(path: str | os.PathLike, image: Float[np.ndarray, "h w 3"]) -> None:
    """Write float RGB in [0, 1] as an 8-bit PNG, atomically."""
    pixels = Image.fromarray(to_uint8(_check_image(image)))
    write_atomically(path, lambda f: pixels.save(f, format="PNG"))
