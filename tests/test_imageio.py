"""Tests of deflow_synth.imageio: reading every kind of file as RGB, atomic writing."""

import logging

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from deflow_synth import imageio
from deflow_synth.errors import DeflowError
from deflow_synth.imageio import (
    ImageError,
    UnusableImageError,
    image_size,
    read_image,
    write_image_atomic,
    write_png_atomic,
)


def gradient(height: int = 12, width: int = 16) -> np.ndarray:
    """A (H, W, 3) uint8 image whose pixels all differ, so orientations are distinguishable."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 15, y * 20, (x * 7 + y * 11) % 256], axis=2).astype(np.uint8)


def save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


# Modes


def test_rgb_png_is_read_exactly(tmp_path):
    pixels = gradient()
    path = save(Image.fromarray(pixels), tmp_path / "rgb.png")

    image = read_image(path)

    assert image.dtype == np.float32 and image.shape == (12, 16, 3)
    assert image.flags.c_contiguous
    np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), pixels)


def test_grayscale_and_bilevel_are_repeated_over_the_channels(tmp_path):
    gray = gradient()[:, :, 0]
    paths = [
        save(Image.fromarray(gray), tmp_path / "gray.png"),
        save(Image.fromarray(gray > 100), tmp_path / "bilevel.png"),
    ]

    for path, expected in zip(paths, [gray / 255, (gray > 100) * 1.0]):
        image = read_image(path)
        assert image.shape == (12, 16, 3)
        for channel in range(3):
            np.testing.assert_allclose(image[:, :, channel], expected, atol=1e-6)


def test_palette_images_use_their_colours(tmp_path):
    pixels = gradient()
    palette = Image.fromarray(pixels).quantize(colors=16)
    path = save(palette, tmp_path / "palette.png")

    expected = np.asarray(palette.convert("RGB")) / 255

    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 100, 0]
    rgba[..., 3] = [[0, 255, 128], [51, 255, 0]]
    path = save(Image.fromarray(rgba), tmp_path / "rgba.png")

    image = read_image(path)

    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] / 255 * alpha + (1 - alpha)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    np.testing.assert_allclose(image[0, 0], [1, 1, 1])


def test_gray_alpha_and_palette_transparency_are_composited_over_white(tmp_path):
    gray_alpha = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0

    np.testing.assert_allclose(
        read_image(save(gray_alpha, tmp_path / "la.png"))[0], [[1] * 3, [0] * 3]
    )
    path = save(palette, tmp_path / "p.png", transparency=0)
    np.testing.assert_allclose(read_image(path)[0], [[1, 1, 1], [0, 0, 1]])


def test_16bit_grayscale_keeps_full_precision(tmp_path):
    values = np.array([[0, 1, 257, 32768], [40000, 65534, 65535, 12345]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "gray16.png")

    image = read_image(path)

    np.testing.assert_allclose(image[:, :, 1], values / 65535, atol=1e-7)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_color_keeps_full_precision(tmp_path, suffix):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    path = tmp_path / f"rgb16{suffix}"
    cv2.imwrite(str(path), rgb[:, :, ::-1])

    image = read_image(path)

    np.testing.assert_allclose(image, rgb / 65535, atol=1e-7)
    # Pillow alone would keep only the high byte: make sure these values are not that.
    assert np.abs(image * 255 - np.floor(rgb / 256)).max() > 0.1


def test_16bit_rgba_is_composited_over_white(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rgba = np.array([[[60000, 30000, 0, 0], [60000, 30000, 0, 65535]]], dtype=np.uint16)
    path = tmp_path / "rgba16.png"
    cv2.imwrite(str(path), rgba[:, :, [2, 1, 0, 3]])

    image = read_image(path)

    np.testing.assert_allclose(image[0], [[1, 1, 1], [60000 / 65535, 30000 / 65535, 0]], atol=1e-6)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    rgb = Image.fromarray(np.full((8, 8, 3), [200, 40, 90], dtype=np.uint8))
    path = save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=100)

    image = read_image(path)

    np.testing.assert_allclose(image, np.full((8, 8, 3), [200, 40, 90]) / 255, atol=6 / 255)


def test_cmyk_goes_through_its_icc_profile(tmp_path, monkeypatch):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    path = save(cmyk, tmp_path / "profiled.jpg", icc_profile=b"embedded profile")
    seen = {}

    def profile(data):
        seen["profile"] = data.read()
        return "source"

    def convert(image, source, target, outputMode):
        seen["arguments"] = (image.mode, source, outputMode)
        return Image.new("RGB", image.size, (1, 2, 3))

    monkeypatch.setattr(ImageCms, "ImageCmsProfile", profile)
    monkeypatch.setattr(ImageCms, "profileToProfile", convert)

    image = read_image(path)

    assert seen == {"profile": b"embedded profile", "arguments": ("CMYK", "source", "RGB")}
    np.testing.assert_allclose(image[0, 0], np.array([1, 2, 3]) / 255)


def test_cmyk_with_a_broken_icc_profile_falls_back_with_a_warning(tmp_path, caplog):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    path = save(cmyk, tmp_path / "broken-profile.jpg", icc_profile=b"not a profile")

    with caplog.at_level(logging.WARNING, logger="deflow_synth"):
        image = read_image(path)

    assert "ICC profile unusable" in caplog.text
    np.testing.assert_allclose(image[0, 0], [1, 0, 0], atol=3 / 255)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[imageio.EXIF_ORIENTATION] = orientation
    path = save(Image.fromarray(gradient()), tmp_path / "rotated.png", exif=exif)

    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")) / 255
    image = read_image(path)

    assert image.shape == expected.shape
    np.testing.assert_allclose(image, expected, atol=1e-6)
    if orientation in (5, 6, 7, 8):
        assert image.shape == (16, 12, 3)


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])

    np.testing.assert_allclose(read_image(path)[0, 0], [1, 0, 0], atol=1e-6)


def test_odd_file_names(tmp_path):
    path = save(Image.fromarray(gradient()), tmp_path / "été photo 写真 #1.png")

    assert read_image(path).shape == (12, 16, 3)
    assert image_size(path) == (16, 12)


# Bad files


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = save(noise, tmp_path / f"whole{suffix}")
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(ImageError, match=rf"truncated\{suffix}: corrupt or truncated") as caught:
        read_image(path)
    assert not isinstance(caught.value, UnusableImageError)


def test_garbage_with_an_image_name_is_broken_not_unusable(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all")

    with pytest.raises(ImageError, match="corrupt or unsupported image file") as caught:
        read_image(path)
    assert not isinstance(caught.value, UnusableImageError)
    assert isinstance(caught.value, DeflowError)


def test_other_files_are_not_images(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")

    with pytest.raises(UnusableImageError, match=r"notes\.txt: not an image file"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot be read"):
        read_image(tmp_path / "missing.png")


def test_float_images_are_unusable(tmp_path):
    path = save(Image.fromarray(np.ones((4, 4), dtype=np.float32) * 0.5), tmp_path / "float.tif")

    with pytest.raises(UnusableImageError, match="unsupported colour mode 'F'"):
        read_image(path)


def test_pixel_limit(tmp_path):
    path = save(Image.fromarray(gradient()), tmp_path / "small.png")

    with pytest.raises(
        UnusableImageError, match="16x12 px is over the limit of 0.0001 megapixels"
    ):
        read_image(path, max_pixels=100)


@pytest.mark.parametrize(("side", "message"), [(11_000, "over the limit"), (14_000, "bomb")])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side, message):
    path = save(Image.new("1", (side, side)), tmp_path / "bomb.png")

    with pytest.raises(UnusableImageError, match=message):
        read_image(path)


# Writing


def test_write_png_atomic_round_trip(tmp_path):
    pixels = gradient()
    path = tmp_path / "new" / "folder" / "out.png"

    write_png_atomic(path, pixels)

    np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]


@pytest.mark.parametrize("image_format", ["TIFF", "BMP"])
def test_write_other_lossless_formats(tmp_path, image_format):
    pixels = gradient()
    path = tmp_path / f"out.{image_format.lower()}"

    write_image_atomic(path, pixels, image_format)

    np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels)


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    write_png_atomic(path, gradient())
    before = path.read_bytes()

    def interrupted(self, file, **options):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_png_atomic(path, np.zeros((4, 4, 3), dtype=np.uint8))

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_write_checks_the_array(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_png_atomic(tmp_path / "a.png", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png_atomic(tmp_path / "a.png", np.zeros((4, 4, 2), dtype=np.uint8))
    assert not list(tmp_path.iterdir())
