"""Image loading: every Pillow mode to float RGB, EXIF orientation, errors naming the file,
preprocessing bit-identical to torchvision's eval transform, and path expansion."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from jaxattr.image import (
    ImageLoadError,
    center_crop,
    eval_sizes,
    expand_paths,
    load_batch,
    load_image,
    preprocess,
    resize_shorter_side,
    to_array,
    to_rgb,
)
from jaxattr.models import model_info

WHITE = (1.0, 1.0, 1.0)


def _save(tmp_path, image: Image.Image, name: str, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _palette_image(transparent: bool) -> tuple[Image.Image, dict]:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putdata([0, 1])
    return image, ({"transparency": 0} if transparent else {})


# (mode written, file name, image, save kwargs, expected RGB of pixel (0, 0) and (0, 1))
def _mode_cases():
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255)])
    p_opaque, _ = _palette_image(False)
    p_transparent, p_kwargs = _palette_image(True)
    binary = Image.new("1", (2, 1))
    binary.putdata([0, 255])
    grey = Image.new("L", (2, 1))
    grey.putdata([0, 100])
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    rgb = Image.new("RGB", (2, 1))
    rgb.putdata([(1, 2, 3), (250, 128, 0)])
    sixteen = Image.new("I;16", (2, 1))
    sixteen.putdata([300, 65535])
    sixteen_big_endian = Image.new("I;16B", (2, 1))
    sixteen_big_endian.putdata([300, 65535])
    int32 = Image.fromarray(np.array([[70000, 13107]], np.int32))
    floats = Image.fromarray(np.array([[-0.5, 0.25]], np.float32))
    grey_keyed = Image.new("L", (2, 1))
    grey_keyed.putdata([3, 100])
    return [
        ("1", "binary.png", binary, {}, [(0, 0, 0), WHITE]),
        ("L", "grey.png", grey, {}, [(0, 0, 0), (100 / 255,) * 3]),
        ("LA", "grey_alpha.png", la, {}, [WHITE, (40 / 255,) * 3]),
        (
            "P",
            "palette.png",
            p_opaque,
            {},
            [(10 / 255, 20 / 255, 30 / 255), (200 / 255, 100 / 255, 50 / 255)],
        ),
        ("P", "palette_transparent.png", p_transparent, p_kwargs, [WHITE, (200 / 255, 100 / 255, 50 / 255)]),
        ("L", "grey_keyed.png", grey_keyed, {"transparency": 3}, [WHITE, (100 / 255,) * 3]),
        ("RGBA", "rgba.png", rgba, {}, [WHITE, (1.0, 0.0, 0.0)]),
        ("CMYK", "cmyk.tif", cmyk, {}, [WHITE, (0.0, 1.0, 1.0)]),
        ("RGB", "rgb.png", rgb, {}, [(1 / 255, 2 / 255, 3 / 255), (250 / 255, 128 / 255, 0.0)]),
        # 300 / 65535 is not a multiple of 1/255: passes only if 16-bit precision is kept.
        ("I;16", "sixteen.png", sixteen, {}, [(300 / 65535,) * 3, WHITE]),
        ("I;16B", "sixteen_be.tif", sixteen_big_endian, {}, [(300 / 65535,) * 3, WHITE]),
        ("I", "int32.tif", int32, {}, [WHITE, (13107 / 65535,) * 3]),
        ("F", "float.tif", floats, {}, [(0.0, 0.0, 0.0), (0.25,) * 3]),
    ]


@pytest.mark.parametrize(
    "mode, name, image, kwargs, expected", _mode_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_every_mode_loads_as_float_rgb(tmp_path, mode, name, image, kwargs, expected):
    path = _save(tmp_path, image, name, **kwargs)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really holds this mode
    pixels = load_image(path)
    assert pixels.dtype == np.float32 and pixels.shape == (1, 2, 3)
    np.testing.assert_allclose(pixels[0], np.array(expected, np.float32), atol=1e-6)


def test_partial_transparency_blends_with_white(tmp_path):
    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    pixel = load_image(_save(tmp_path, rgba, "half.png"))[0, 0]
    np.testing.assert_allclose(pixel, 1 - 128 / 255, atol=1 / 255)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(tmp_path, Image.fromarray(pixels), "rotated.png", exif=exif)
    loaded = load_image(path)
    assert loaded.shape == (4, 2, 3)
    np.testing.assert_array_equal(loaded, np.rot90(pixels, k=-1) / np.float32(255))


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "no such file"),
        (b"certainly not an image", "not an image file"),
        ("truncated", "corrupt or truncated"),
    ],
)
def test_unreadable_files_raise_an_error_naming_them(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (9, 9, 9)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as error:
        load_image(path)
    assert error.value.path == path and str(path) in str(error.value)


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_a_mode_pillow_cannot_convert_is_reported():
    with pytest.raises(ValueError, match="unsupported image mode 'La'"):
        to_rgb(Image.new("La", (2, 2)))


# ---------------------------------------------------------------- parity with torchvision


def _torchvision_eval(image: Image.Image, resize: int, crop: int, interpolation: str) -> np.ndarray:
    transforms = pytest.importorskip("torchvision.transforms")
    mode = getattr(transforms.InterpolationMode, interpolation.upper())
    pipeline = transforms.Compose(
        [transforms.Resize(resize, interpolation=mode), transforms.CenterCrop(crop), transforms.ToTensor()]
    )
    return pipeline(image).permute(1, 2, 0).numpy()


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    "size, resize, crop",
    [((53, 37), 32, 28), ((37, 53), 32, 28), ((40, 40), 40, 40), ((451, 300), 73, 64), ((31, 45), 20, 25)],
)
def test_preprocessing_equals_torchvision(size, resize, crop, interpolation):
    image = _noise_image(*size)
    ours = to_array(center_crop(resize_shorter_side(to_rgb(image), resize, interpolation), crop))
    np.testing.assert_array_equal(ours, _torchvision_eval(image, resize, crop, interpolation))


def test_preprocess_follows_the_model_info(tmp_path):
    info = dataclasses.replace(model_info("resnet18"), image_size=24, resize_size=30, interpolation="bicubic")
    image = _noise_image(45, 31, seed=1)
    path = _save(tmp_path, image, "noise.png")
    expected = _torchvision_eval(image, 30, 24, "bicubic")
    np.testing.assert_array_equal(preprocess(image, info), expected)
    np.testing.assert_array_equal(load_image(path, info), expected)


def test_other_image_sizes_keep_the_crop_ratio():
    info = model_info("resnet18")  # 256 -> 224
    assert eval_sizes(info) == (256, 224)
    assert eval_sizes(info, 64) == (73, 64)  # floor(64 * 256 / 224), timm's crop_pct rule


def test_sixteen_bit_images_are_resized_in_float(tmp_path):
    info = dataclasses.replace(model_info("resnet18"), image_size=16, resize_size=20)
    eight = np.random.default_rng(2).integers(0, 256, (27, 33), dtype=np.uint8)
    sixteen = Image.fromarray((eight.astype(np.uint16) * 257))  # the same picture with 16 bits
    assert sixteen.mode == "I;16"
    from_sixteen = preprocess(sixteen, info)
    from_eight = preprocess(Image.fromarray(eight).convert("RGB"), info)
    # Same filter; only the 8-bit path's rounding differs.
    np.testing.assert_allclose(from_sixteen, from_eight, atol=1 / 255 + 1e-6)
    assert not np.allclose(from_sixteen * 255, np.round(from_sixteen * 255))  # not quantised to 8 bits


def test_load_batch_stacks_preprocessed_images(tmp_path):
    info = dataclasses.replace(model_info("resnet18"), image_size=16, resize_size=18)
    paths = [_save(tmp_path, _noise_image(20 + i, 30, seed=i), f"{i}.png") for i in range(3)]
    batch = load_batch(paths, info)
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], load_image(paths[1], info))
    with pytest.raises(ValueError, match="at least one"):
        load_batch([], info)


# ------------------------------------------------------------------------ path expansion


def test_expand_paths(tmp_path):
    for name in ["b.PNG", "a.jpg", "notes.txt", ".hidden.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert expand_paths([tmp_path]) == [tmp_path / "a.jpg", tmp_path / "b.PNG"]
    assert expand_paths([tmp_path], recursive=True) == [
        tmp_path / "a.jpg",
        tmp_path / "b.PNG",
        tmp_path / "sub" / "c.jpeg",
        tmp_path / "sub" / "deeper" / "d.webp",
    ]
    # Files are taken as given (whatever their extension), in order, each once.
    explicit = [tmp_path / "notes.txt", tmp_path / "a.jpg", tmp_path]
    assert expand_paths(explicit) == [tmp_path / "notes.txt", tmp_path / "a.jpg", tmp_path / "b.PNG"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        expand_paths([tmp_path / "missing.jpg"])
