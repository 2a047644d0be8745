"""Reading any photo as float RGB and writing PNG files atomically.

``read_image`` turns every common file into one (H, W, 3) float32 array in [0, 1]: EXIF
orientation is applied, grayscale and palette images become RGB, 16-bit images keep their full
precision, CMYK goes through its embedded ICC profile when there is one, and transparent pixels
are composited over white. Files that cannot be used raise :class:`ImageError`, whose message
names the file and the reason.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from .atomic import atomic_write
from .errors import DeflowError
from .log import logger

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "UnusableImageError",
    "image_size",
    "read_image",
    "write_image_atomic",
    "write_png_atomic",
]

# Larger images are refused as decompression bombs: 100 MP is about 1.2 GB as float RGB.
MAX_PIXELS = 100_000_000

EXIF_ORIENTATION = 0x0112

# What a numpy (H, W, C) array needs for each EXIF orientation to be shown upright.
ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}

# Pillow modes read as 16-bit integers, and modes converted to RGB(A) before anything else.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
CONVERTED_MODES = {
    "1": "L",
    "P": "RGBA",
    "PA": "RGBA",
    "La": "LA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "YCbCr": "RGB",
}


class ImageError(DeflowError):
    """A file that cannot be read as an image (corrupt, truncated, empty, too large, ...)."""


class UnusableImageError(ImageError):
    """An intact file this tool does not use: not an image, over the pixel limit, or in a
    colour mode without a meaningful RGB reading (such as 32-bit float)."""


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    Arguments:
        path: the image file.
    """
    with open_image(Path(path), MAX_PIXELS) as image:
        return image.size


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image as an upright (H, W, 3) float32 RGB array in [0, 1].

    Grayscale is repeated over the channels; 16-bit values are divided by 65535, so nothing of
    their precision is lost; CMYK is converted through its embedded ICC profile when it has one;
    transparent pixels are composited over white (alpha is a weight between the colour and 1).
    Only the first frame of an animation is read.

    Arguments:
        path: the image file.
        max_pixels: larger images are refused (decompression-bomb limit).
    """
    path = Path(path)

    with open_image(path, max_pixels) as image:
        try:
            values = decode(image, path)
        except (ImageError, MemoryError):
            raise
        except Exception as error:
            raise ImageError(f"{path}: corrupt or truncated image ({error})") from error
        # Read after decoding: reading EXIF can load the pixels and drop the decoder's layout.
        orientation = exif_orientation(image, path)

    rgb = flatten_alpha(values)
    if orientation in ORIENTATIONS:
        rgb = ORIENTATIONS[orientation](rgb)

    return np.ascontiguousarray(rgb, dtype=np.float32)


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image, after the empty-file and size checks."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror or error})") from error

    with warnings.catch_warnings():
        # The pixel limit is checked below with our own, clearer message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise UnusableImageError(
                f"{path}: too large, refused as a decompression bomb ({error})"
            ) from error
        except UnidentifiedImageError as error:
            if path.suffix.lower() in Image.registered_extensions():
                raise ImageError(f"{path}: corrupt or unsupported image file") from error
            raise UnusableImageError(f"{path}: not an image file") from error
        except OSError as error:
            raise ImageError(f"{path}: cannot be read ({error})") from error
        except Exception as error:
            raise ImageError(f"{path}: corrupt image header ({error})") from error

    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise UnusableImageError(
            f"{path}: {width}x{height} px is over the limit of {max_pixels / 1e6:g} megapixels "
            "(decompression-bomb protection)"
        )
    if width == 0 or height == 0:
        image.close()
        raise ImageError(f"{path}: image has no pixels ({width}x{height})")

    return image


def exif_orientation(image: Image.Image, path: Path) -> int:
    """The EXIF orientation tag (1 = upright); unreadable EXIF data counts as upright."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, TypeError, ValueError, KeyError) as error:
        logger.warning("%s: EXIF data unreadable, orientation ignored (%s)", path, error)
        return 1


def decode(image: Image.Image, path: Path) -> np.ndarray:
    """The pixels as float (H, W, 3 or 4) in [0, 1]: RGB or RGB followed by alpha."""
    if image.mode in ("RGB", "RGBA") and "16" in raw_mode(image):
        return decode_16bit_color(image, path)

    image.load()
    mode = image.mode
    if mode == "CMYK":
        return to_float(np.asarray(cmyk_to_rgb(image, path)), 255)
    if mode == "P" and "transparency" not in image.info:
        image = image.convert("RGB")
    elif mode in CONVERTED_MODES:
        image = image.convert(CONVERTED_MODES[mode])

    if image.mode in SIXTEEN_BIT_MODES:
        gray = to_float(np.asarray(image).astype(np.float32), 65535)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        raise UnusableImageError(f"{path}: unsupported colour mode {image.mode!r}")

    values = to_float(np.asarray(image), 255)
    if image.mode == "L":
        return np.repeat(values[:, :, None], 3, axis=2)
    if image.mode == "LA":
        return values[:, :, [0, 0, 0, 1]]

    return values


def raw_mode(image: Image.Image) -> str:
    """The decoder's raw pixel layout, such as ``"RGB;16B"`` for 16-bit RGB PNG."""
    if not image.tile:
        return ""
    args = image.tile[0].args

    return args if isinstance(args, str) else str(args[0]) if args else ""


def decode_16bit_color(image: Image.Image, path: Path) -> np.ndarray:
    """16-bit RGB(A) at full precision, which Pillow would cut to the high byte.

    OpenCV (installed with basicsr) decodes these; without it, Pillow's 8-bit values are used.
    """
    try:
        import cv2
    except ImportError:
        logger.warning("%s: 16-bit colour read as 8-bit (OpenCV is not installed)", path)
        image.load()
        return to_float(np.asarray(image), 255)

    data = np.fromfile(path, dtype=np.uint8)
    values = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if values is None or values.ndim != 3 or values.shape[2] not in (3, 4):
        raise ImageError(f"{path}: corrupt or truncated 16-bit image")

    order = [2, 1, 0, 3][: values.shape[2]]
    scale = 65535 if values.dtype == np.uint16 else 255

    return to_float(values[:, :, order], scale)


def cmyk_to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """CMYK to sRGB through the embedded ICC profile, or Pillow's plain formula without one."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            target = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, source, target, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as error:
            logger.warning("%s: ICC profile unusable, plain CMYK conversion (%s)", path, error)

    return image.convert("RGB")


def to_float(values: np.ndarray, maximum: int) -> np.ndarray:
    """Integer values as float32 in [0, 1], computed in place (large images)."""
    result = values.astype(np.float32)
    result /= maximum

    return np.clip(result, 0, 1, out=result)


def flatten_alpha(values: np.ndarray) -> np.ndarray:
    """RGB of an RGB(A) float array, transparent pixels composited over white."""
    if values.shape[2] == 3:
        return values
    alpha = values[:, :, 3:]

    return values[:, :, :3] * alpha + (1 - alpha)


def write_png_atomic(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit image as PNG so that ``path`` is either absent or complete.

    Arguments:
        path: the destination; missing folders are created.
        array: uint8 (H, W), (H, W, 3) or (H, W, 4).
    """
    write_image_atomic(path, array, "PNG")


def write_image_atomic(path: Path, array: np.ndarray, image_format: str = "PNG") -> None:
    """Write an 8-bit image via a temporary file in the same folder, then rename it.

    An interruption (Ctrl-C included) leaves no temporary file behind; the file is not synced
    to disk, as the rename alone is enough to never expose a partial file to readers.

    Arguments:
        path: the destination; missing folders are created.
        array: uint8 (H, W), (H, W, 3) or (H, W, 4).
        image_format: a Pillow format name such as ``"PNG"``, ``"TIFF"`` or ``"BMP"``.
    """
    if array.dtype != np.uint8:
        raise ValueError(f"array: expected dtype uint8, got {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"array: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    with atomic_write(path) as file:
        Image.fromarray(array).save(file, format=image_format)
