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
images with the same filters, so they keep their precision. References differ in this transform
(GNL resizes every model to 256 and crops 224; RISE and IIA resize to 224x224 without a crop), so
it is a value, `Preprocessing(resize, crop, interpolation)`: `Preprocessing.of(info)` is the
model's, and `preprocess`/`load_image`/`load_batch` take either a ModelInfo or a Preprocessing.

Files are untrusted input. Only regular files are opened (a FIFO, socket or device is reported,
never read: reading a FIFO would block). The size is read from the header (Pillow opens lazily)
and checked before any pixel is decoded: at most `MAX_PIXELS` pixels and `MAX_SIDE` pixels per
side (module defaults, or `max_pixels=`/`max_side=` per call). Pillow's own bomb check measures
pixels only, so a 1x40000 strip passes it, and resizing its shorter side to 256 then asks for
2.6 gigapixels: `preprocess` also refuses a resized image above `MAX_PIXELS`. Data shorter than
the header claims is an error (Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` is held False while
loading), and so are NaN or infinite values in floating-point images. Every failure is an
`ImageLoadError` whose message is one line naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from jaxtyping import Float
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from jaxattr._files import NotARegularFileError, display_path, file_kind, one_line, open_regular_file
from jaxattr.models.registry import ModelInfo

# 128 Mpx: above every camera sensor up to the 102 Mpx medium-format class, below Pillow's own
# hard limit (2 x Image.MAX_IMAGE_PIXELS = 179 Mpx); decoded as float32 RGB at full resolution
# (`load_image` without a model) that is 1.5 GB. Pillow warns (DecompressionBombWarning) above 89 Mpx.
MAX_PIXELS = 128_000_000
# 32768 px per side: above any sensor's side (14204 px) and WebP's 16383 limit, half JPEG's 65535;
# with MAX_PIXELS it bounds the strips whose resize explodes.
MAX_SIDE = 32_768
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "RGBa", "PA")
_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,  # label images (segmentation masks): values never blended
}


class ImageLoadError(ValueError):
    """A file that cannot be read as an image: missing, not a regular file, too large, corrupt,
    or in an unsupported format. `str()` is one line: the path (undecodable bytes and control
    characters escaped) and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = one_line(reason)
        super().__init__(f"{display_path(path)}: {self.reason}")


class SkippedInputWarning(UserWarning):
    """expand_paths left out an entry it could not use (its default report)."""


@functools.cache
def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of every format this Pillow can decode, as
    directory scans select files: `Image.registered_extensions()` less the formats Pillow only
    writes (PDF) or only identifies (stubs such as BUFR, GRIB, HDF5, WMF; MPEG video)."""
    Image.init()
    decodable = {
        name
        for name, (factory, _) in Image.OPEN.items()
        if name != "MPEG" and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    return frozenset(ext for ext, name in Image.registered_extensions().items() if name in decodable)


# ------------------------------------------------------------------------------ decoding


def _positive(name: str, value: int | None, default: int) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_size(path: Path, size: tuple[int, int], max_pixels: int, max_side: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(path, f"empty image ({width}x{height} pixels)")
    if max(width, height) > max_side:
        raise ImageLoadError(
            path, f"{width}x{height} pixels: a side exceeds the limit of {max_side} (jaxattr.image.MAX_SIDE)"
        )
    if width * height > max_pixels:
        limit = f"the limit of {max_pixels} pixels (jaxattr.image.MAX_PIXELS)"
        raise ImageLoadError(path, f"{width}x{height} pixels exceeds {limit}")


_TRUNCATION_FLAG = threading.Lock()


@contextlib.contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """Holds Pillow's global LOAD_TRUNCATED_IMAGES False (if someone set it) while an image loads."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_FLAG:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_reason(path: Path, error: OSError) -> str:
    if isinstance(error, NotARegularFileError):
        return f"is {error}"
    if isinstance(error, FileNotFoundError):
        return "dangling symbolic link" if os.path.islink(path) else "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return error.strerror or str(error)


def open_image(
    path: str | os.PathLike, *, max_pixels: int | None = None, max_side: int | None = None
) -> Image.Image:
    """The decoded image at `path` with its EXIF orientation applied.

    Raises ImageLoadError for anything but a regular file holding one complete image within
    `max_pixels` and `max_side` (defaults MAX_PIXELS and MAX_SIDE), checked before decoding."""
    path = Path(path)
    max_pixels = _positive("max_pixels", max_pixels, MAX_PIXELS)
    max_side = _positive("max_side", max_side, MAX_SIDE)
    try:
        file = open_regular_file(path)
    except OSError as e:
        raise ImageLoadError(path, _open_reason(path, e)) from None
    try:
        with file, _truncated_images_refused(), Image.open(file) as image:
            _check_size(path, image.size, max_pixels, max_side)  # from the header; nothing decoded yet
            image.load()
            _check_size(path, image.size, max_pixels, max_side)
            return ImageOps.exif_transpose(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can read (unknown format or corrupt)") from None
    except Image.DecompressionBombError as e:  # Pillow's own check ran first, at Image.open
        raise ImageLoadError(path, f"{e} (Pillow's Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageLoadError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as an 8-bit "RGB" image, or, for grey images with more than 8 bits, a float "F"
    image with values in [0, 1] (see the module docstring for each mode)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if image.mode == "F" and not np.isfinite(values).all():
            raise ValueError(f"{np.count_nonzero(~np.isfinite(values))} pixel values are NaN or infinite")
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


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """An eval transform, decoded image -> float32 RGB in [0, 1], `size` x `size`.

    With a crop: the shorter side is resized to `resize` (aspect ratio kept), then the centre
    `crop` x `crop` is cut (torchvision's `Resize(resize) + CenterCrop(crop)`). Without one
    (crop=None): the image is resized to `resize` x `resize`, aspect ratio not kept
    (`Resize((resize, resize))`, as RISE and IIA preprocess). `interpolation`: Pillow's
    'bilinear' or 'bicubic' filter, as torchvision applies it to PIL images."""

    resize: int
    crop: int | None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is None and name == "crop":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Preprocessing.{name} must be a positive integer, got {value!r}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; expected one of {', '.join(_FILTERS)}")

    @property
    def size(self) -> int:
        """The side of the square the transform produces: the model's input size."""
        return self.resize if self.crop is None else self.crop

    @classmethod
    def of(cls, info: ModelInfo, image_size: int | None = None) -> "Preprocessing":
        """The eval transform of the model `info` describes, at `image_size` (default: the model's;
        at another size the resize keeps the model's crop ratio)."""
        resize, crop = eval_sizes(info, image_size)
        return cls(resize, crop, info.interpolation)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_preprocessing(transform: ModelInfo | Preprocessing, image_size: int | None) -> Preprocessing:
    if isinstance(transform, Preprocessing):
        if image_size is not None and image_size != transform.size:
            raise ValueError(f"image_size {image_size} differs from the Preprocessing's size {transform.size}")
        return transform
    return Preprocessing.of(transform, image_size)


def preprocess(
    image: Image.Image,
    info: ModelInfo | Preprocessing,
    image_size: int | None = None,
    *,
    max_pixels: int | None = None,
) -> Float[np.ndarray, "s s 3"]:
    """The eval transform of a decoded image: float32 RGB in [0, 1], square. `info`: a model's
    ModelInfo (its eval transform, at `image_size` if given) or a Preprocessing.

    Raises ValueError if resizing would make an image above `max_pixels` (default MAX_PIXELS):
    an extreme aspect ratio such as a 1x40000 strip."""
    transform = _as_preprocessing(info, image_size)
    short, long = sorted(image.size)
    if short < 1:
        raise ValueError(f"empty image ({image.size[0]}x{image.size[1]} pixels)")
    size = transform.resize
    resized_pixels = size * size if transform.crop is None else size * int(size * long / short)
    if resized_pixels > _positive("max_pixels", max_pixels, MAX_PIXELS):
        raise ValueError(
            f"aspect ratio {image.size[0]}x{image.size[1]} is too extreme: resizing the shorter side to "
            f"{size} would make {resized_pixels} pixels (jaxattr.image.MAX_PIXELS)"
        )
    return to_array(_geometry(to_rgb(image), transform, transform.interpolation))


def _geometry(image: Image.Image, transform: Preprocessing, interpolation: str) -> Image.Image:
    """`transform`'s resize (and crop) of a PIL image with the filter `interpolation`."""
    if transform.crop is None:
        return image.resize((transform.resize, transform.resize), _FILTERS[interpolation])
    return center_crop(resize_shorter_side(image, transform.resize, interpolation), transform.crop)


def preprocess_labels(labels: Image.Image, info: ModelInfo | Preprocessing, image_size: int | None = None) -> np.ndarray:
    """The geometry of an eval transform (a model's, or a Preprocessing) applied to a label image
    (a segmentation mask of the original image's size): resized with NEAREST, as torchvision
    resizes masks, then the centre crop if any (outside the image: 0). The values as stored: class
    indices of a palette ("P") image, not its colours; (s, s) for one channel, (s, s, c) for several."""
    return np.asarray(_geometry(labels, _as_preprocessing(info, image_size), "nearest"))


# ------------------------------------------------------------------------------- loading


def load_image(
    path: str | os.PathLike,
    info: ModelInfo | Preprocessing | None = None,
    image_size: int | None = None,
    *,
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> Float[np.ndarray, "h w 3"]:
    """The image at `path` as float32 RGB in [0, 1]: at full resolution, or with `info`
    preprocessed as that model's eval transform (a ModelInfo) or as a Preprocessing says.
    Raises ImageLoadError naming the file (see `open_image` for the limits)."""
    image = open_image(path, max_pixels=max_pixels, max_side=max_side)
    try:
        if info is None:
            return to_array(to_rgb(image))
        return preprocess(image, info, image_size, max_pixels=max_pixels)
    except ValueError as e:
        raise ImageLoadError(path, str(e)) from None


def load_batch(
    paths: Sequence[str | os.PathLike],
    info: ModelInfo | Preprocessing,
    image_size: int | None = None,
    *,
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> Float[np.ndarray, "b s s 3"]:
    """Images preprocessed for the model `info` describes (or as a Preprocessing says), stacked
    into one NHWC batch."""
    if not paths:
        raise ValueError("load_batch needs at least one image path")
    return np.stack(
        [load_image(path, info, image_size, max_pixels=max_pixels, max_side=max_side) for path in paths]
    )


# ------------------------------------------------------------------------ path expansion


def _warn(error: ImageLoadError) -> None:
    warnings.warn(str(error), SkippedInputWarning, stacklevel=4)


def _scan(
    directory: Path, recursive: bool, report: Callable[[ImageLoadError], None], excluded: frozenset[Path] = frozenset()
) -> list[Path]:
    """The image files in `directory` (and, with `recursive`, its subdirectories but those in
    `excluded`, resolved paths), sorted.

    Symbolic links to directories are not followed (as in `find` and pathlib's rglob), so a
    link loop cannot make the scan endless; links to files are followed."""
    files, pending = [], [directory]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as e:
            report(ImageLoadError(current, f"cannot read directory ({e.strerror or e}); skipped"))
            continue
        for entry in entries:
            path = current / entry.name
            try:
                if recursive and entry.is_dir(follow_symlinks=False):
                    if _identity(path) not in excluded:
                        pending.append(path)
                    continue
            except OSError:  # vanished or unreadable: the stat below reports it
                pass
            if entry.name.startswith(".") or path.suffix.lower() not in image_extensions():
                continue
            try:
                mode = entry.stat().st_mode  # follows a link to the file it names
            except OSError as e:
                report(ImageLoadError(path, f"{_open_reason(path, e)}; skipped"))
                continue
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                report(ImageLoadError(path, f"is {file_kind(mode)}, not a regular file; skipped"))
    return sorted(files)


def _identity(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop (RuntimeError on Python < 3.13)
        return path.absolute()


def expand_paths(
    inputs: Iterable[str | os.PathLike],
    *,
    recursive: bool = False,
    on_skip: Callable[[ImageLoadError], None] | None = None,
    exclude: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Image files named by `inputs`: files as given (any extension, or none: the loader tries
    them), directories expanded to the image files in them (by `image_extensions()`, hidden
    files skipped, sorted; with `recursive`, also in subdirectories).

    The order is deterministic (inputs in order, each directory sorted) and a file reached twice
    is listed once. What a scan cannot use -- an unreadable directory; a FIFO, socket or device,
    a dangling link or a link loop named like an image -- is left out and reported to `on_skip`
    as an ImageLoadError (default: a SkippedInputWarning each); the scan goes on. A recursive
    scan does not enter the directories in `exclude` (e.g. an output directory inside an input
    directory). Raises FileNotFoundError for an input that does not exist."""
    report = on_skip or _warn
    excluded = frozenset(_identity(Path(d)) for d in exclude)
    found: dict[Path, Path] = {}  # resolved -> as reached, for de-duplication
    for item in map(Path, inputs):
        try:
            is_dir = stat.S_ISDIR(os.stat(item).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.islink(item):
                raise FileNotFoundError(f"no such file or directory: {display_path(item)}") from None
            is_dir = False  # a dangling link: listed, the loader says so
        except OSError:  # a link loop, a name too long, no permission: the loader says which
            is_dir = False
        files = _scan(item, recursive, report, excluded) if is_dir else [item]
        for path in files:
            found.setdefault(_identity(path), path)
    return list(found.values())
