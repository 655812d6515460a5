"""Image files in, model-ready arrays out.

Decoding (Pillow) gives float32 RGB in [0, 1], the pixel space of every jaxattr model and method.
EXIF orientation is applied and animated files give their first frame. Colour conversions:

* transparency (RGBA, LA, RGBa, PA, and P/L/RGB with a transparent colour) is composited on
  white. Dropping the alpha channel instead would show whatever colour the encoder stored under
  transparent pixels (often black), which a classifier reads as content.
* 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's conversion to RGB (grey is replicated).
* I;16, I;16L, I;16B, I;16N (16-bit grey): divided by 65535, kept in float (no 8-bit rounding).
* I (32-bit integer, how some tools store 16-bit grey): divided by 65535, clipped to [0, 1].
* F (32-bit float): taken as intensities in [0, 1], clipped.

Preprocessing is the eval transform of torchvision and timm, done as they do it on PIL images:
resize the shorter side to `ModelInfo.resize_size` with Pillow's bilinear or bicubic filter,
centre-crop `image_size`, divide by 255. 8-bit images are resized as 8-bit RGB (bit-identical to
`Resize + CenterCrop + ToTensor`); high-precision grey images are resized as Pillow float ("F")
images with the same filters, so they keep their precision.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from jaxtyping import Float
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxattr.models.registry import ModelInfo

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "RGBa", "PA")
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageLoadError(ValueError):
    """A file that cannot be read as an image: missing, corrupt, or in an unsupported format."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ------------------------------------------------------------------------------ decoding


def open_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path` with its EXIF orientation applied."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can read (unknown format or corrupt)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, str(e)) from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageLoadError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as an 8-bit "RGB" image, or, for grey images with more than 8 bits, a float "F"
    image with values in [0, 1] (see the module docstring for each mode)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if image.mode != "F":
            values = values / 65535
        return Image.fromarray(np.clip(values, 0.0, 1.0).astype(np.float32))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"unsupported image mode {image.mode!r} ({e})") from None


def to_array(image: Image.Image) -> Float[np.ndarray, "h w 3"]:
    """An "RGB" or "F" image from `to_rgb` as float32 RGB in [0, 1] (8-bit: x / 255 as ToTensor)."""
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)  # bicubic overshoots
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB or F image from to_rgb, got mode {image.mode!r}")
    return np.asarray(image, dtype=np.float32) / np.float32(255)


# ------------------------------------------------------------------------- preprocessing


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision's `Resize(size)`: the shorter side becomes `size`, the longer one keeps the
    aspect ratio, truncated to an integer."""
    if interpolation not in _FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {', '.join(_FILTERS)}")
    width, height = image.size
    short, long = sorted((width, height))
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, _FILTERS[interpolation])


def _crop_start(length: int, crop: int) -> int:
    # torchvision pads a too-small image by (crop - length) // 2 on the leading side before cropping;
    # Pillow's crop fills outside the image with 0, as torchvision's padding does.
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)`."""
    width, height = image.size
    left, top = _crop_start(width, size), _crop_start(height, size)
    return image.crop((left, top, left + size, top + size))


def eval_sizes(info: ModelInfo, image_size: int | None = None) -> tuple[int, int]:
    """(resize_size, crop size) of `info`'s eval transform at `image_size` (default: the model's).

    At another size the resize keeps the model's crop ratio, as timm's `crop_pct` does."""
    size = image_size or info.image_size
    if size == info.image_size:
        return info.resize_size, size
    return math.floor(size * info.resize_size / info.image_size), size


def preprocess(
    image: Image.Image, info: ModelInfo, image_size: int | None = None
) -> Float[np.ndarray, "s s 3"]:
    """The model's eval transform of a decoded image: float32 RGB in [0, 1], `image_size` square."""
    resize_size, crop_size = eval_sizes(info, image_size)
    resized = resize_shorter_side(to_rgb(image), resize_size, info.interpolation)
    return to_array(center_crop(resized, crop_size))


# ------------------------------------------------------------------------------- loading


def load_image(
    path: str | os.PathLike, info: ModelInfo | None = None, image_size: int | None = None
) -> Float[np.ndarray, "h w 3"]:
    """The image at `path` as float32 RGB in [0, 1]: at full resolution, or with `info`
    preprocessed as that model's eval transform. Raises ImageLoadError naming the file."""
    image = open_image(path)
    try:
        return to_array(to_rgb(image)) if info is None else preprocess(image, info, image_size)
    except ValueError as e:
        raise ImageLoadError(path, str(e)) from None


def load_resized(
    path: str | os.PathLike, size: int | tuple[int, int], interpolation: str = "bilinear"
) -> Float[np.ndarray, "h w 3"]:
    """The image at `path` resized to `size` (an int: square; or (height, width)) without keeping
    its aspect ratio and without cropping: torchvision's `Resize((h, w))` on a PIL image, as IIA's
    segmentation protocol loads its images (iia.md §4.1). float32 RGB in [0, 1]."""
    height, width = (size, size) if isinstance(size, int) else size
    if interpolation not in _FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {', '.join(_FILTERS)}")
    image = open_image(path)
    try:
        return to_array(to_rgb(image).resize((width, height), _FILTERS[interpolation]))
    except ValueError as e:
        raise ImageLoadError(path, str(e)) from None


def load_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """A segmentation mask file as its stored values, (h, w): grey values, palette indices (VOC's
    class ids and its 255 boundary) or booleans (1-bit files); an RGB(A) file gives its channels
    (h, w, c) for the caller to check. Resized to `size` with nearest-neighbour sampling, as the
    IIA protocol resizes masks (torchvision `Resize(..., NEAREST)`): no new values appear."""
    image = open_image(path)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        image = image.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(image)


def load_batch(
    paths: Sequence[str | os.PathLike], info: ModelInfo, image_size: int | None = None
) -> Float[np.ndarray, "b s s 3"]:
    """Images preprocessed for the model `info` describes, stacked into one NHWC batch."""
    if not paths:
        raise ValueError("load_batch needs at least one image path")
    return np.stack([load_image(path, info, image_size) for path in paths])


def expand_paths(inputs: Iterable[str | os.PathLike], *, recursive: bool = False) -> list[Path]:
    """Image files named by `inputs`: files as given, directories expanded to the image files in
    them (by extension, hidden files skipped, sorted; with `recursive`, also in subdirectories).

    The order is deterministic (inputs in order, each directory sorted) and a file reached twice
    is listed once. Raises FileNotFoundError for an input that does not exist."""
    found: dict[Path, Path] = {}  # resolved -> as reached, for de-duplication
    for item in map(Path, inputs):
        if item.is_dir():
            candidates = item.rglob("*") if recursive else item.iterdir()
            files = sorted(
                p
                for p in candidates
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
            )
        elif item.exists():
            files = [item]
        else:
            raise FileNotFoundError(f"no such file or directory: {item}")
        for path in files:
            found.setdefault(path.resolve(), path)
    return list(found.values())
