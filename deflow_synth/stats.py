"""Degradation statistics of images: noise per intensity, spectrum, blocking, colour correlation.

The statistics describe a degradation without knowing how it was made and without reference
pairs. Each image's *residual* stands in for its degradation:

- estimated residual (no reference): the image minus a Gaussian-smoothed copy of itself
  (``SMOOTHING_SIGMA`` pixels), divided by the filter's gain on white noise, so that white
  Gaussian noise of standard deviation s gives a residual of standard deviation s. The
  smoothed copy gives each pixel its intensity. Noise, colour and spectrum statistics use
  only the flattest ``FLAT_FRACTION`` of the pixels of each intensity (:func:`flat_mask`),
  where little of the picture's own texture leaks into the residual.
- paired residual: a degraded image minus its clean counterpart, exact, on every pixel.

Noise levels are robust standard deviations, 1.4826 times the median absolute residual,
which edges and texture that still leak through barely move; the plain root mean square is
reported beside them. Statistics of many images merge by adding their sums
(:class:`ResidualStatistics`), and :func:`summarize` turns the sums into numbers.

Warning:
    A no-reference estimate cannot tell noise from fine texture. Its noise levels include a
    floor set by the content (1 to 1.5 of 255 levels on detailed, noise-free photos), its
    spectrum follows the content more than the noise, and JPEG hides most of its noise at
    frequencies the residual does not see (the block steps still show it). Compare folders of
    similar content, and give the clean counterparts of generated images where they exist.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "FLAT_FRACTION",
    "INTENSITY_BINS",
    "SMOOTHING_SIGMA",
    "TILE_SIZE",
    "ResidualStatistics",
    "block_differences",
    "estimate_residual",
    "flat_mask",
    "gaussian_kernel",
    "image_statistics",
    "merge",
    "paired_residual",
    "quantization_step",
    "radial_power_spectrum",
    "robust_std",
    "smooth",
    "smoothing_radius",
    "summarize",
    "summary_distance",
]

SMOOTHING_SIGMA = 1.0
FLAT_FRACTION = 0.2
ENERGY_RADIUS = 7  # flatness window: 15 x 15 pixels, enough values for a steady energy
INTENSITY_BINS = 12
BLOCK_SIZE = 8  # JPEG's block side
# Spectra are taken on square tiles, so that flat tiles can be chosen as for the noise.
TILE_SIZE = 32
FREQUENCY_BINS = TILE_SIZE // 2

# Absolute residuals are counted in fine bins (a twentieth of an 8-bit level) so that the
# median, and so the robust standard deviation, can be read from merged histograms.
VALUE_BINS = 2500
VALUE_MAX = 0.5
MAD_TO_STD = 1.4826
MIN_PIXELS = 200  # fewer pixels than this in an intensity bin give no noise level

# Intensity thirds reported as low, mid and high.
INTENSITY_RANGES = {"low": (0.0, 1 / 3), "mid": (1 / 3, 2 / 3), "high": (2 / 3, 1.0)}

# The high/low power ratio compares the top octave of the residual spectrum with the one below.
LOW_BAND = (0.125, 0.25)
HIGH_BAND = (0.25, 0.5 + 1 / (4 * FREQUENCY_BINS))  # up to and including 1/2


# Residuals


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalized 1-D Gaussian kernel of radius ceil(3 sigma).

    Arguments:
        sigma: standard deviation in pixels.
    """
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))

    return kernel / kernel.sum()


def smooth(image: np.ndarray, sigma: float = SMOOTHING_SIGMA) -> np.ndarray:
    """Separable Gaussian blur of an image where the kernel fits inside (no padding).

    Arguments:
        image: (H, W, C) float array.
        sigma: standard deviation in pixels.

    Returns:
        (H - 2r, W - 2r, C) array, r the kernel radius; border pixels are dropped rather
        than padded, so no invented values reach the statistics.
    """
    kernel = gaussian_kernel(sigma)
    taps = len(kernel)
    height, width = image.shape[:2]
    if height < taps or width < taps:
        raise ValueError(
            f"expected an image of at least {taps}x{taps} pixels, got {width}x{height}"
        )

    rows = sum(weight * image[i : height - taps + 1 + i] for i, weight in enumerate(kernel))

    return sum(weight * rows[:, i : width - taps + 1 + i] for i, weight in enumerate(kernel))


def smoothing_radius(sigma: float = SMOOTHING_SIGMA) -> int:
    """Pixels lost at each border by :func:`smooth` (the kernel radius)."""
    return len(gaussian_kernel(sigma)) // 2


def estimate_residual(
    image: np.ndarray, sigma: float = SMOOTHING_SIGMA
) -> tuple[np.ndarray, np.ndarray]:
    """No-reference residual: the image minus its smoothed copy, scaled for white noise.

    Arguments:
        image: (H, W, 3) float array in [0, 1].
        sigma: smoothing standard deviation in pixels.

    Returns:
        residual and intensity (the smoothed image), both (H - 2r, W - 2r, 3).
    """
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    intensity = smooth(image, sigma)
    inner = image[radius:-radius, radius:-radius]

    # White noise n leaves n - g * n with variance 1 - 2 g(0) + sum(g^2) times its own.
    center = kernel[radius] ** 2
    white_gain = np.sqrt(1 - 2 * center + np.sum(kernel**2) ** 2)

    return (inner - intensity) / white_gain, intensity


def quantization_step(image: np.ndarray) -> float:
    """1/255 when every value of an image in [0, 1] is a multiple of it (8-bit), else 0.

    Arguments:
        image: float array in [0, 1].
    """
    levels = np.asarray(image, dtype=np.float64) * 255
    return 1 / 255 if np.allclose(levels, np.rint(levels), atol=1e-3) else 0.0


def paired_residual(degraded: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact residual of a degraded image with a known clean counterpart.

    Arguments:
        degraded: (H, W, 3) float array in [0, 1].
        clean: (H, W, 3) float array in [0, 1], the same picture without degradation.

    Returns:
        residual (degraded - clean) and intensity (the clean image).
    """
    if degraded.shape != clean.shape:
        raise ValueError(f"expected a clean image of shape {degraded.shape}, got {clean.shape}")

    return degraded - clean, clean


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2 radius + 1)^2 window around each pixel (mirrored at the borders)."""
    size = 2 * radius + 1
    padded = np.pad(values, radius, mode="reflect")
    summed = np.pad(padded.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    window = summed[size:, size:] - summed[:-size, size:] - summed[size:, :-size]

    return (window + summed[:-size, :-size]) / size**2


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(values.size)
    ranks[np.argsort(values, axis=None, kind="stable")] = np.arange(values.size)

    return ranks.reshape(values.shape)


def flat_mask(
    residual: np.ndarray, intensity: np.ndarray, fraction: float = FLAT_FRACTION
) -> np.ndarray:
    """The flattest pixels of each intensity bin, where texture leaks least into the residual.

    Flatness ranks every pixel twice: by the gradient of the smoothed image (edges, shading)
    and by the residual energy in the ENERGY_RADIUS window around it (fine texture, which
    smoothing hides from the gradient); the two ranks are added. The lowest ``fraction`` of
    each intensity bin (channel mean) is kept, so that brighter, noisier parts of the image
    are not passed over when the noise depends on the signal. Choosing windows by their own
    energy lowers the noise level of pure noise by about 3 %.

    Arguments:
        residual: (H, W, C) estimated residual.
        intensity: (H, W, C) smoothed image.
        fraction: share of the pixels to keep, in (0, 1].

    Returns:
        (H, W) boolean mask.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"expected a flat fraction in (0, 1], got {fraction}")

    grad_y, grad_x = np.gradient(intensity.mean(axis=2))
    energy = _box_mean((residual**2).mean(axis=2), ENERGY_RADIUS)
    score = _ranks(np.hypot(grad_x, grad_y)) + _ranks(energy)

    level = intensity.mean(axis=2)
    bins = np.clip((level * INTENSITY_BINS).astype(int), 0, INTENSITY_BINS - 1)
    mask = np.zeros(level.shape, dtype=bool)
    for index in np.unique(bins):
        inside = bins == index
        mask |= inside & (score <= np.quantile(score[inside], fraction))

    return mask


# Spectrum


def _tiles(residual: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The TILE_SIZE tiles of a residual; with a mask, those holding most masked pixels."""
    rows, columns = residual.shape[0] // TILE_SIZE, residual.shape[1] // TILE_SIZE
    if rows == 0 or columns == 0:
        raise ValueError(
            f"expected a residual of at least {TILE_SIZE} pixels a side, "
            f"got {residual.shape[1]}x{residual.shape[0]}"
        )

    def split(array: np.ndarray) -> np.ndarray:
        cropped = array[: rows * TILE_SIZE, : columns * TILE_SIZE]
        tiled = cropped.reshape(rows, TILE_SIZE, columns, TILE_SIZE, *array.shape[2:])
        return tiled.swapaxes(1, 2).reshape(rows * columns, TILE_SIZE, TILE_SIZE, *array.shape[2:])

    tiles = split(residual)
    if mask is None:
        return tiles

    # Keep as large a share of the tiles as the mask keeps of the pixels, the flattest first.
    flat_share = split(mask).mean(axis=(1, 2))
    count = max(1, round(float(mask.mean()) * len(tiles)))

    return tiles[np.argsort(-flat_share, kind="stable")[:count]]


def radial_power_spectrum(
    residual: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Radially summed power spectrum of a residual's tiles.

    The residual is cut into TILE_SIZE tiles; with a mask, only the tiles holding most
    masked (flat) pixels are used, as large a share of the tiles as the mask keeps of the
    pixels. Power is |FFT|^2 / pixels per tile, averaged over channels: white noise of
    variance v gives v at every frequency. The residual has no low frequencies to leak at the
    tile borders, so no window is applied.

    Arguments:
        residual: (H, W, C) array, H and W at least TILE_SIZE.
        mask: optional (H, W) boolean mask of the flat pixels.

    Returns:
        power_sum (FREQUENCY_BINS,) summed over tiles and the FFT bins of each radial bin
        (centred on k / TILE_SIZE cycles per pixel, k = 1..FREQUENCY_BINS), and counts
        (FREQUENCY_BINS,) of the FFT bins summed.
    """
    tiles = _tiles(residual, mask)
    spectrum = np.fft.fft2(tiles - tiles.mean(axis=(1, 2), keepdims=True), axes=(1, 2))
    power = (np.abs(spectrum) ** 2).mean(axis=3).sum(axis=0) / TILE_SIZE**2  # (T, T)

    frequency = np.fft.fftfreq(TILE_SIZE)
    bins = np.rint(np.hypot(*np.meshgrid(frequency, frequency)) * TILE_SIZE).astype(int)
    inside = (bins >= 1) & (bins <= FREQUENCY_BINS)
    power_sum = np.bincount(bins[inside] - 1, power[inside], minlength=FREQUENCY_BINS)
    counts = np.bincount(bins[inside] - 1, minlength=FREQUENCY_BINS) * float(len(tiles))

    return power_sum, counts


def block_differences(
    residual: np.ndarray, mask: np.ndarray | None = None, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute steps between neighbouring pixels across and off JPEG's 8-pixel block borders.

    Blocking raises the steps across the borders (between pixels 8k - 1 and 8k of the image)
    above the others; the picture's own edges fall on every position alike.

    Arguments:
        residual: (H, W, C) array.
        mask: optional (H, W) boolean mask; a step counts when both its pixels are masked.
        offset: position of residual[0, 0] in the image, so the borders fall where JPEG put
            them (the radius of the smoothing for an estimated residual).

    Returns:
        sums (2,) of the steps (channel mean) across and off the borders, and their counts.
    """
    if mask is None:
        mask = np.ones(residual.shape[:2], dtype=bool)

    sums, counts = np.zeros(2), np.zeros(2)
    for axis in (0, 1):
        steps = np.abs(np.diff(residual, axis=axis)).mean(axis=2)
        both = mask[1:] & mask[:-1] if axis == 0 else mask[:, 1:] & mask[:, :-1]
        positions = np.arange(steps.shape[axis]) + offset + 1
        across = np.expand_dims(positions % BLOCK_SIZE == 0, 1 - axis)
        for index, selected in enumerate((both & across, both & ~across)):
            sums[index] += steps[selected].sum()
            counts[index] += selected.sum()

    return sums, counts


# Accumulated statistics


@dataclass(frozen=True)
class ResidualStatistics:
    """Sums over the residuals of one or more images; merge several with :func:`merge`.

    Arguments:
        abs_histogram: (INTENSITY_BINS, 3, VALUE_BINS + 1) counts of |residual| per intensity
            bin and channel (the last bin counts values past VALUE_MAX).
        square_sum: (INTENSITY_BINS, 3) sums of squared residuals.
        power_sum: (FREQUENCY_BINS,) summed radial power.
        power_count: (FREQUENCY_BINS,) FFT bins in each radial bin.
        block_sums: (2,) sums of absolute steps across and off the 8-pixel block borders.
        block_counts: (2,) steps counted in each.
        products: (3, 3) sums of residual products between channels.
        sums: (3,) sums of residuals.
        n_pixels: pixels in the colour sums.
        n_images: images merged.
        quantum: step between the residual values (the largest of the merged), 0 when
            continuous.
    """

    abs_histogram: np.ndarray
    square_sum: np.ndarray
    power_sum: np.ndarray
    power_count: np.ndarray
    block_sums: np.ndarray
    block_counts: np.ndarray
    products: np.ndarray
    sums: np.ndarray
    n_pixels: int
    n_images: int
    quantum: float = 0.0


def image_statistics(
    residual: np.ndarray,
    intensity: np.ndarray,
    mask: np.ndarray | None = None,
    quantum: float = 0.0,
    offset: int = 0,
) -> ResidualStatistics:
    """Statistics of one image's residual.

    Arguments:
        residual: (H, W, 3) residual, H and W at least TILE_SIZE.
        intensity: (H, W, 3) intensity of each residual value, in [0, 1].
        mask: optional (H, W) boolean mask of the (flat) pixels to use; the spectrum uses the
            tiles that hold most of them.
        quantum: step between the residual's possible values (1/255 for the difference of two
            8-bit images), 0 for continuous values; see :func:`robust_std`.
        offset: position of residual[0, 0] in the image (see :func:`block_differences`).
    """
    if residual.ndim != 3 or residual.shape[2] != 3 or intensity.shape != residual.shape:
        raise ValueError(
            f"expected residual and intensity of one (H, W, 3) shape, "
            f"got {residual.shape} and {intensity.shape}"
        )
    if mask is None:
        mask = np.ones(residual.shape[:2], dtype=bool)

    values = residual[mask]  # (N, 3)
    levels = intensity[mask]
    intensity_bin = np.clip((levels * INTENSITY_BINS).astype(int), 0, INTENSITY_BINS - 1)
    value_bin = np.minimum((np.abs(values) / VALUE_MAX * VALUE_BINS).astype(int), VALUE_BINS)
    channel = np.broadcast_to(np.arange(3), values.shape)

    # One flat index per (intensity bin, channel, value bin) cell.
    cell = (intensity_bin * 3 + channel) * (VALUE_BINS + 1) + value_bin
    histogram = np.bincount(cell.ravel(), minlength=INTENSITY_BINS * 3 * (VALUE_BINS + 1))
    squares = np.bincount(
        (intensity_bin * 3 + channel).ravel(), (values**2).ravel(), minlength=INTENSITY_BINS * 3
    )

    power_sum, power_count = radial_power_spectrum(residual, mask)
    block_sums, block_counts = block_differences(residual, mask, offset)

    return ResidualStatistics(
        abs_histogram=histogram.reshape(INTENSITY_BINS, 3, VALUE_BINS + 1),
        square_sum=squares.reshape(INTENSITY_BINS, 3),
        power_sum=power_sum,
        power_count=power_count,
        block_sums=block_sums,
        block_counts=block_counts,
        products=values.T @ values,
        sums=values.sum(axis=0),
        n_pixels=len(values),
        n_images=1,
        quantum=quantum,
    )


def merge(statistics: Sequence[ResidualStatistics]) -> ResidualStatistics:
    """The statistics of several images together (their sums added).

    Arguments:
        statistics: one or more per-image or already merged statistics.
    """
    if not statistics:
        raise ValueError("expected at least one set of statistics, got none")

    def total(name: str):
        values = [getattr(item, name) for item in statistics]
        return max(values) if name == "quantum" else sum(values)

    return ResidualStatistics(
        **{name: total(name) for name in ResidualStatistics.__dataclass_fields__}
    )


# Summary numbers


def robust_std(histogram: np.ndarray, quantum: float = 0.0) -> np.ndarray:
    """1.4826 times the median absolute residual, read from |residual| histograms.

    The median is interpolated linearly in the cumulative counts. Residuals that take only
    multiples of ``quantum`` (differences of 8-bit images) are read as grouped data: each
    value stands for the interval of one step around it, so the median moves smoothly with
    the noise instead of jumping from one multiple to the next.

    Arguments:
        histogram: (..., VALUE_BINS + 1) counts of |residual| (last bin: past VALUE_MAX).
        quantum: step between possible residual values, 0 for continuous values.

    Returns:
        (...) standard deviations; NaN where fewer than MIN_PIXELS values were counted.
    """
    bin_width = VALUE_MAX / VALUE_BINS
    if quantum > bin_width:
        nodes = np.concatenate([[0.0], np.arange(0.5 * quantum, VALUE_MAX, quantum)])
    else:
        nodes = np.arange(VALUE_BINS + 1) * bin_width
    edges = np.minimum(np.rint(nodes / bin_width).astype(int), VALUE_BINS)

    rows = histogram.reshape(-1, histogram.shape[-1])
    cumulative = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(rows, axis=1)], axis=1)
    medians = np.full(len(rows), np.nan)
    for index, row in enumerate(cumulative[:, edges]):
        half = cumulative[index, -1] / 2
        upper = np.searchsorted(row, half)
        if cumulative[index, -1] < MIN_PIXELS or not 0 < upper < len(row):
            continue
        share = (half - row[upper - 1]) / (row[upper] - row[upper - 1])
        medians[index] = nodes[upper - 1] + share * (nodes[upper] - nodes[upper - 1])

    return MAD_TO_STD * medians.reshape(histogram.shape[:-1])


def _correlation(stats: ResidualStatistics) -> np.ndarray:
    n = max(stats.n_pixels, 1)
    mean = stats.sums / n
    covariance = stats.products / n - np.outer(mean, mean)
    scale = np.sqrt(np.clip(np.diag(covariance), 1e-20, None))

    return covariance / np.outer(scale, scale)


def _band_power(frequencies: np.ndarray, power: np.ndarray, band: tuple[float, float]) -> float:
    inside = (frequencies >= band[0]) & (frequencies < band[1]) & np.isfinite(power)
    return float(power[inside].mean()) if inside.any() else float("nan")


def summarize(stats: ResidualStatistics) -> dict:
    """Numbers that describe a degradation, as a JSON-ready dict ([0, 1] intensity units).

    Keys: ``noise_std`` (INTENSITY_BINS x 3 robust std per intensity bin and channel, None
    where too few pixels), ``noise_rms`` (the same as root mean squares), ``pixels`` per
    bin and channel, ``channel_std`` (3,), ``intensity_std`` (low/mid/high thirds, channels
    together), ``frequencies`` and ``power`` (radial spectrum), ``high_low_ratio`` (mean
    power in HIGH_BAND over LOW_BAND), ``block_ratio`` (mean step across 8-pixel block
    borders over the mean step elsewhere; 1 without blocking), ``color_correlation`` (3 x 3) and
    ``mean_color_correlation`` (mean off-diagonal), ``images``.

    Arguments:
        stats: merged statistics of a folder.
    """
    histogram = stats.abs_histogram
    pixels = histogram.sum(axis=-1)
    rms = np.sqrt(
        np.divide(stats.square_sum, pixels, out=np.full(pixels.shape, np.nan), where=pixels > 0)
    )
    rms[pixels < MIN_PIXELS] = np.nan

    edges = np.linspace(0, 1, INTENSITY_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    thirds = {}
    for name, (low, high) in INTENSITY_RANGES.items():
        rows = (centres >= low) & (centres < high)
        thirds[name] = robust_std(histogram[rows].sum(axis=(0, 1)), stats.quantum)

    frequencies = np.arange(1, FREQUENCY_BINS + 1) / (2 * FREQUENCY_BINS)
    power = np.divide(
        stats.power_sum,
        stats.power_count,
        out=np.full(FREQUENCY_BINS, np.nan),
        where=stats.power_count > 0,
    )
    correlation = _correlation(stats)
    off_diagonal = correlation[~np.eye(3, dtype=bool)]
    block_means = np.divide(
        stats.block_sums, stats.block_counts, out=np.zeros(2), where=stats.block_counts > 0
    )
    block_ratio = block_means[0] / block_means[1] if block_means[1] > 0 else None

    return _json_ready(
        {
            "images": stats.n_images,
            "intensity_bins": centres,
            "noise_std": robust_std(histogram, stats.quantum),
            "noise_rms": rms,
            "pixels": pixels,
            "channel_std": robust_std(histogram.sum(axis=0), stats.quantum),
            "intensity_std": thirds,
            "frequencies": frequencies,
            "power": power,
            "high_low_ratio": _band_power(frequencies, power, HIGH_BAND)
            / _band_power(frequencies, power, LOW_BAND),
            "block_ratio": block_ratio,
            "color_correlation": correlation,
            "mean_color_correlation": float(off_diagonal.mean()),
        }
    )


def _json_ready(value):
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)

    return value


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in np.ravel(values)], dtype=float)


def summary_distance(a: dict, b: dict) -> dict:
    """How far two folders' degradations are apart, from their :func:`summarize` dicts.

    Three parts, each zero for identical statistics, added into ``total``:
    ``noise`` (RMS over intensity bins and channels of ln(std_a / std_b)), ``spectrum``
    (RMS over frequencies of ln(power_a / power_b) / 2, the log ratio of amplitudes) and
    ``color`` (RMS difference of the three off-diagonal correlations).

    Arguments:
        a, b: summaries of the two folders.
    """
    noise = np.log(_array(a["noise_std"]) / _array(b["noise_std"]))
    spectrum = np.log(_array(a["power"]) / _array(b["power"])) / 2
    upper = np.triu_indices(3, 1)
    color = np.asarray(a["color_correlation"])[upper] - np.asarray(b["color_correlation"])[upper]

    parts = {
        "noise": _rms(noise),
        "spectrum": _rms(spectrum),
        "color": _rms(color),
    }
    parts["total"] = sum(value for value in parts.values() if value is not None)

    return parts


def _rms(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if len(values) else None
