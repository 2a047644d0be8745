"""Tests of the degradation statistics on synthetic images with known degradations."""

import io

import numpy as np
import pytest
from PIL import Image

from deflow_synth import stats

SIZE = 160


def ramp_image(size: int = SIZE) -> np.ndarray:
    """A smooth picture: every channel a different ramp inside [0.1, 0.9]."""
    y, x = np.mgrid[0:size, 0:size] / size
    return np.stack([0.1 + 0.8 * x, 0.1 + 0.8 * y, 0.1 + 0.4 * (x + y)], axis=2)


def summary_of(image: np.ndarray) -> dict:
    residual, intensity = stats.estimate_residual(image)
    mask = stats.flat_mask(residual, intensity)
    statistics = stats.image_statistics(residual, intensity, mask, offset=stats.smoothing_radius())

    return stats.summarize(statistics)


def measured(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in np.ravel(values)], dtype=float)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255


# Noise level


@pytest.mark.parametrize("sigma", [0.005, 0.02, 0.05])
def test_gaussian_noise_level_per_intensity_and_channel(sigma):
    rng = np.random.default_rng(1)
    image = ramp_image(256) + rng.normal(0, sigma, (256, 256, 3))

    summary = summary_of(image)
    # Bins at the ends of the ramps hold few pixels, and only those that noise pushed there.
    well_filled = np.ravel(summary["pixels"]) >= 600
    per_bin = measured(summary["noise_std"])[well_filled]

    assert len(per_bin) >= 15
    np.testing.assert_allclose(per_bin, sigma, rtol=0.15)
    np.testing.assert_allclose(summary["channel_std"], sigma, rtol=0.06)
    for third in ("low", "mid", "high"):
        assert summary["intensity_std"][third] == pytest.approx(sigma, rel=0.1)


def test_signal_dependent_noise_gives_rising_curve():
    rng = np.random.default_rng(2)
    clean = ramp_image()
    expected_std = np.sqrt(0.002 * clean + 1e-5)
    image = clean + rng.normal(size=clean.shape) * expected_std

    summary = summary_of(image)
    red = measured(np.asarray(summary["noise_std"], dtype=object)[:, 0])
    centres = np.asarray(summary["intensity_bins"])
    known = np.isfinite(red)

    np.testing.assert_allclose(red[known], np.sqrt(0.002 * centres[known] + 1e-5), rtol=0.15)
    assert summary["intensity_std"]["high"] > 1.5 * summary["intensity_std"]["low"]
    assert np.all(np.diff(red[known]) > -0.1 * red[known][1:])


def test_flat_pixels_keep_texture_out_of_the_noise_level():
    rng = np.random.default_rng(3)
    image = ramp_image()
    # The right half carries a fine texture, stronger than the noise.
    image[:, SIZE // 2 :] += 0.1 * np.sin(np.arange(SIZE // 2) * 2.2)[None, :, None]
    image += rng.normal(0, 0.01, image.shape)

    residual, intensity = stats.estimate_residual(image)
    mask = stats.flat_mask(residual, intensity)
    flat = stats.summarize(stats.image_statistics(residual, intensity, mask))
    everywhere = stats.summarize(stats.image_statistics(residual, intensity))

    assert mask.mean() == pytest.approx(stats.FLAT_FRACTION, abs=0.02)
    assert mask[:, : SIZE // 2 - 10].mean() > 2 * mask[:, SIZE // 2 :].mean()
    # Some texture still leaks in, but far less than without the mask.
    assert min(everywhere["channel_std"]) > 2 * 0.01
    assert 0.009 < min(flat["channel_std"]) and max(flat["channel_std"]) < 0.014


def test_paired_residual_is_exact_and_reads_8bit_steps_smoothly():
    rng = np.random.default_rng(4)
    clean = np.round(ramp_image() * 255) / 255
    for levels in (0.8, 1.3, 2.2):
        noisy = np.clip(np.round((clean + rng.normal(0, levels / 255, clean.shape)) * 255), 0, 255)
        degraded = noisy / 255

        residual, intensity = stats.paired_residual(degraded, clean)
        quantum = stats.quantization_step(degraded)
        summary = stats.summarize(stats.image_statistics(residual, intensity, quantum=quantum))

        # Rounding adds 1/12 of a squared level to the noise variance.
        expected = np.sqrt(levels**2 + 1 / 12) / 255
        np.testing.assert_allclose(summary["channel_std"], expected, rtol=0.05)


def test_robust_std_of_a_known_histogram():
    values = np.abs(np.random.default_rng(5).normal(0, 0.03, 200_000))
    histogram = np.zeros(stats.VALUE_BINS + 1)
    bins = np.minimum((values / stats.VALUE_MAX * stats.VALUE_BINS).astype(int), stats.VALUE_BINS)
    np.add.at(histogram, bins, 1)

    assert stats.robust_std(histogram) == pytest.approx(0.03, rel=0.01)
    assert np.isnan(stats.robust_std(np.zeros(stats.VALUE_BINS + 1)))


def test_quantization_step():
    assert stats.quantization_step(np.arange(256) / 255) == pytest.approx(1 / 255)
    assert stats.quantization_step(np.linspace(0, 1, 1000)) == 0.0


# Colour correlation


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_color_correlation_of_the_noise(rho):
    rng = np.random.default_rng(6)
    shared = rng.normal(0, 0.02, (SIZE, SIZE, 1))
    own = rng.normal(0, 0.02, (SIZE, SIZE, 3))
    image = ramp_image() + np.sqrt(rho) * shared + np.sqrt(1 - rho) * own

    summary = summary_of(image)
    correlation = np.asarray(summary["color_correlation"])

    np.testing.assert_allclose(np.diag(correlation), 1.0, atol=1e-9)
    assert summary["mean_color_correlation"] == pytest.approx(rho, abs=0.06)


# Spectrum and blocking


def test_white_noise_spectrum_is_flat_at_its_variance():
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.02, (128, 128, 3))

    power_sum, counts = stats.radial_power_spectrum(noise)
    power = power_sum / counts

    np.testing.assert_allclose(power[2:], 0.02**2, rtol=0.2)
    np.testing.assert_allclose(power_sum.sum() / counts.sum(), 0.02**2, rtol=0.05)


def test_blur_lowers_high_frequency_power():
    rng = np.random.default_rng(8)
    noisy = ramp_image() + rng.normal(0, 0.03, (SIZE, SIZE, 3))
    radius = stats.smoothing_radius(0.8)
    blurred = np.pad(
        stats.smooth(noisy, 0.8), ((radius, radius), (radius, radius), (0, 0)), "edge"
    )

    sharp, soft = summary_of(noisy), summary_of(blurred)

    assert soft["high_low_ratio"] < 0.3 * sharp["high_low_ratio"]
    assert soft["block_ratio"] == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("quality", [30, 70])
def test_jpeg_shows_as_block_steps_and_lost_high_frequencies(quality):
    rng = np.random.default_rng(9)
    noisy = np.clip(ramp_image(256) + rng.normal(0, 0.03, (256, 256, 3)), 0, 1)

    plain, compressed = summary_of(noisy), summary_of(jpeg(noisy, quality))

    assert plain["block_ratio"] == pytest.approx(1.0, abs=0.1)
    assert compressed["block_ratio"] > 2.0
    assert compressed["high_low_ratio"] < 0.5 * plain["high_low_ratio"]


def test_block_steps_follow_the_image_grid():
    image = np.zeros((32, 32, 3))
    image[:, 8:16] = 1.0  # steps between columns 7|8 and 15|16, on the block borders

    sums, counts = stats.block_differences(image)
    shifted_sums, _ = stats.block_differences(image[:, 3:], offset=3)

    assert sums[1] == 0 and sums[0] > 0
    np.testing.assert_allclose(shifted_sums, sums)
    assert counts.sum() == 2 * 31 * 32


# Merging and distances


def test_merge_adds_images_and_matches_pooled_pixels():
    rng = np.random.default_rng(10)
    images = [ramp_image() + rng.normal(0, s, (SIZE, SIZE, 3)) for s in (0.01, 0.03)]
    parts = []
    for image in images:
        residual, intensity = stats.estimate_residual(image)
        parts.append(stats.image_statistics(residual, intensity))

    merged = stats.merge(parts)
    summary = stats.summarize(merged)

    assert merged.n_images == 2
    assert merged.n_pixels == sum(p.n_pixels for p in parts)
    np.testing.assert_array_equal(
        merged.abs_histogram, parts[0].abs_histogram + parts[1].abs_histogram
    )
    assert 0.01 < summary["channel_std"][0] < 0.03
    with pytest.raises(ValueError, match="at least one"):
        stats.merge([])


def test_distance_is_zero_for_equal_statistics_and_grows_with_noise():
    rng = np.random.default_rng(11)
    low = summary_of(ramp_image() + rng.normal(0, 0.01, (SIZE, SIZE, 3)))
    same = summary_of(ramp_image() + rng.normal(0, 0.01, (SIZE, SIZE, 3)))
    high = summary_of(ramp_image() + rng.normal(0, 0.02, (SIZE, SIZE, 3)))

    assert stats.summary_distance(low, low)["total"] == 0
    near, far = stats.summary_distance(low, same), stats.summary_distance(low, high)
    assert far["noise"] == pytest.approx(np.log(2), rel=0.2)
    assert far["spectrum"] == pytest.approx(np.log(2), rel=0.2)
    assert near["total"] < 0.5 * far["total"]


def test_summary_is_json_ready():
    import json

    rng = np.random.default_rng(12)
    summary = summary_of(ramp_image() + rng.normal(0, 0.01, (SIZE, SIZE, 3)))

    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text)["images"] == 1
    assert len(summary["noise_std"]) == stats.INTENSITY_BINS
    assert len(summary["power"]) == len(summary["frequencies"]) == stats.FREQUENCY_BINS


# Invalid input


def test_invalid_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least 7x7"):
        stats.smooth(np.zeros((5, 40, 3)))
    with pytest.raises(ValueError, match="clean image of shape"):
        stats.paired_residual(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))
    with pytest.raises(ValueError, match="flat fraction"):
        stats.flat_mask(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), 0.0)
    with pytest.raises(ValueError, match="at least 32 pixels"):
        stats.radial_power_spectrum(np.zeros((20, 64, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stats.image_statistics(np.zeros((40, 40)), np.zeros((40, 40)))
