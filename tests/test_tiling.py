"""Tests of deflow_synth.tiling: the tile grid, noise slicing, stitching and tiled translation."""

import itertools

import numpy as np
import pytest
import torch

from deflow_synth.config import preset
from deflow_synth.flow import ZeroConv2d
from deflow_synth.model import CLEAN, DeFlow
from deflow_synth.tiling import (
    MAX_AUTO_TILE,
    Tile,
    auto_batch_size,
    auto_tile_size,
    draw_noise,
    stitch,
    tile_grid,
    translate_tiled,
)
from deflow_synth.tiling import (
    stack_tiles as tiles_of,
)


def textured_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, H, W) image in [0, 1] with smooth shading, edges and fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.zeros((3, height, width))
    for channel in range(3):
        for _ in range(4):
            fy, fx, phase = rng.uniform(1, 12), rng.uniform(1, 12), rng.uniform(0, 6.3)
            image[channel] += np.sin(2 * np.pi * (fy * y + fx * x) + phase) / 8
    for _ in range(6):
        top, left = rng.integers(0, height), rng.integers(0, width)
        image[:, top : top + height // 4, left : left + width // 5] += rng.uniform(-0.3, 0.3)
    image += rng.normal(0, 0.01, image.shape)

    return torch.from_numpy(np.clip(image + 0.5, 0, 1)).float()[None]


def realistic_model(config, seed: int = 0) -> DeFlow:
    """A random-weight model whose couplings, priors and shift are all active.

    Zero-initialised convolutions get small random weights (so the flow is non-linear and
    spatially coupled), ActNorms are initialised on an image as in training, and the domain
    shift is non-trivial: translated images differ from their input by about 8/255 on average.
    """
    torch.manual_seed(seed)
    model = DeFlow(config)
    for module in model.modules():
        if isinstance(module, ZeroConv2d):
            torch.nn.init.normal_(module.weight, std=0.02)

    x = textured_image(64, 64, seed)
    model.train()
    with torch.no_grad():
        model.encode(x, model.condition(model.condition_image(x)), CLEAN)
        for shift in model.shifts:
            shift.mean.normal_(0, 0.01)
            shift.matrix.normal_(0, 0.03)

    return model.eval()


@pytest.fixture(scope="module")
def small_model() -> DeFlow:
    return realistic_model(preset("small"))


def quantized(y: torch.Tensor) -> torch.Tensor:
    return (y.clamp(0, 1) * 255).round()


# The grid


@pytest.mark.parametrize("length", [8, 16, 40, 64, 200, 264, 512])
@pytest.mark.parametrize(("tile", "overlap"), [(16, 0), (32, 8), (48, 16), (64, 64 - 8), (96, 32)])
def test_grid_covers_image_once_with_aligned_tiles(length, tile, overlap):
    tiles = tile_grid(length, 24, tile, overlap, multiple=8)
    kept = np.zeros((length, 24), dtype=int)

    for t in tiles:
        assert t.top % 8 == 0 and t.left % 8 == 0 and t.bottom % 8 == 0 and t.right % 8 == 0
        assert 0 <= t.top <= t.keep_top < t.keep_bottom <= t.bottom <= length
        assert 0 <= t.left <= t.keep_left < t.keep_right <= t.right <= 24
        assert t.size == tiles[0].size
        kept[t.keep_top : t.keep_bottom, t.keep_left : t.keep_right] += 1

    assert (kept == 1).all()


def test_grid_keeps_half_the_overlap_on_each_side():
    tiles = tile_grid(64, 64, 32, 16, multiple=8)
    tops = sorted({(t.top, t.keep_top, t.keep_bottom, t.bottom) for t in tiles})

    # Tiles start every 16 px; neighbours [0, 32) and [16, 48) meet at 24, 8 px from each edge.
    assert tops == [(0, 0, 24, 32), (16, 24, 40, 48), (32, 40, 64, 64)]


def test_grid_rounds_tile_and_overlap_to_the_multiple():
    tiles = tile_grid(64, 64, 30, 3, multiple=8)
    lefts = sorted({t.left for t in tiles})

    # Tile 30 -> 24, overlap 3 -> 8: four tiles of 24 px per axis, overlapping by 8 or more.
    assert tiles[0].size == (24, 24)
    assert len(lefts) == 4
    assert all(b - a <= 24 - 8 for a, b in itertools.pairwise(lefts))


def test_grid_spreads_tiles_evenly_instead_of_a_thin_last_one():
    tiles = tile_grid(576, 8, 512, 64, multiple=8)

    # Two tiles of 320 px, not 512 px tiles overlapping by 448.
    assert [(t.top, t.bottom, t.keep_top, t.keep_bottom) for t in tiles] == [
        (0, 320, 0, 288),
        (256, 576, 288, 576),
    ]


def test_grid_single_tile_when_untiled_or_tile_is_larger():
    for tile in (None, 1000):
        assert tile_grid(40, 24, tile, 16, multiple=8) == [Tile(0, 40, 0, 24, 0, 40, 0, 24)]


def test_grid_rejects_bad_sizes_and_overlaps():
    with pytest.raises(ValueError, match="multiples of 8"):
        tile_grid(30, 32, 16, 0, multiple=8)
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(64, 64, 16, 16, multiple=8)


def test_split_and_stitch_round_trip_is_exact():
    image = torch.rand(1, 3, 56, 72)
    tiles = tile_grid(56, 72, 24, 8, multiple=8)
    canvas = torch.full_like(image, -1.0)

    stitch(canvas, tiles_of(image, tiles), tiles)

    assert torch.equal(canvas, image)


# Noise fields


def test_noise_fields_have_latent_shapes_and_depend_only_on_the_seed():
    model = DeFlow(preset("small", n_coupling_steps=1, encoder_blocks=1, stacked_blocks=(0,)))

    noise = draw_noise(model, 32, 48, torch.Generator().manual_seed(3))
    again = draw_noise(model, 32, 48, torch.Generator().manual_seed(3))

    assert noise.cond.shape == (1, 3, 8, 12)
    assert noise.dequant.shape == (1, 3, 32, 48)
    assert 0 <= noise.dequant.min() and noise.dequant.max() < 1
    assert [tuple(n.shape) for n in noise.shift] == [(1, 6, 16, 24), (1, 96, 4, 6)]
    assert all(torch.equal(a, b) for a, b in zip(noise.shift, again.shift))
    assert torch.equal(noise.cond, again.cond) and torch.equal(noise.dequant, again.dequant)


def test_one_tile_equals_a_direct_translation(small_model):
    x = textured_image(48, 64)
    h = small_model.condition_image(x)
    noise = draw_noise(small_model, 48, 64, torch.Generator().manual_seed(0))

    tiled = translate_tiled(small_model, x, h, noise, tile_grid(48, 64, None, 0, 8))
    with torch.no_grad():
        cond = small_model.condition(h, noise=noise.cond)
        direct = small_model.translate(
            x, cond, CLEAN, shift_noise=noise.shift, dequant_noise=noise.dequant
        )

    assert torch.equal(tiled, direct)
    assert 2 / 255 < (direct - x).abs().mean() < 20 / 255


def test_batched_tiles_equal_one_at_a_time(small_model):
    x = textured_image(64, 64, seed=1)
    h = small_model.condition_image(x)
    noise = draw_noise(small_model, 64, 64, torch.Generator().manual_seed(1))
    tiles = tile_grid(64, 64, 32, 16, 8)

    single = translate_tiled(small_model, x, h, noise, tiles, batch_size=1)
    batched = translate_tiled(small_model, x, h, noise, tiles, batch_size=4)

    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


# Tiled against untiled


def border_gradient_ratio(y: torch.Tensor, tiles: list[Tile], multiple: int) -> float:
    """Mean |gradient| across the seams where tiles meet over the mean across other lines.

    The flow works on blocks of ``multiple`` pixels, so gradients across block borders differ
    from those inside blocks even without tiling. Seams lie on block borders; they are compared
    with the other block borders, at the same offset in the block.
    """
    y = quantized(y)[0]
    dx = (y[:, :, 1:] - y[:, :, :-1]).abs()  # gradient between columns c - 1 and c
    dy = (y[:, 1:] - y[:, :-1]).abs()
    seam_columns = {t.keep_left for t in tiles if t.keep_left > 0}
    seam_rows = {t.keep_top for t in tiles if t.keep_top > 0}
    phase = next(iter(seam_columns)) % multiple
    assert all(c % multiple == phase for c in seam_columns | seam_rows)

    def lines(length: int, seams: set[int]) -> tuple[list[int], list[int]]:
        same_phase = [c for c in range(1, length) if c % multiple == phase]
        return [c - 1 for c in same_phase if c in seams], [
            c - 1 for c in same_phase if c not in seams
        ]

    seam_x, other_x = lines(y.shape[2], seam_columns)
    seam_y, other_y = lines(y.shape[1], seam_rows)
    at_seams = torch.cat([dx[:, :, seam_x].flatten(), dy[:, seam_y].flatten()])
    elsewhere = torch.cat([dx[:, :, other_x].flatten(), dy[:, other_y].flatten()])

    return (at_seams.mean() / elsewhere.mean()).item()


def assert_tiles_match_untiled(model: DeFlow, x: torch.Tensor, seed: int) -> None:
    """16 tiles of a 512 x 512 image: within 2/255 of untiled on 99.9 % of pixels, no seams."""
    h = model.condition_image(x)
    noise = draw_noise(model, 512, 512, torch.Generator().manual_seed(seed))

    untiled = translate_tiled(model, x, h, noise, tile_grid(512, 512, None, 0, 8))
    tiles = tile_grid(512, 512, 192, 64, 8)
    tiled = translate_tiled(model, x, h, noise, tiles)

    difference = (quantized(tiled) - quantized(untiled)).abs()
    assert len(tiles) == 16
    assert (difference <= 2).float().mean() >= 0.999
    assert abs(border_gradient_ratio(tiled, tiles, 8) - 1) <= 0.05


def test_tiled_matches_untiled_without_seams(small_model):
    x = textured_image(512, 512, seed=2)
    h = small_model.condition_image(x)
    noise = draw_noise(small_model, 512, 512, torch.Generator().manual_seed(2))

    assert_tiles_match_untiled(small_model, x, seed=2)

    # Control: tiles without overlap leave seams that the same measure sees.
    seamed_tiles = tile_grid(512, 512, 128, 0, 8)
    seamed = translate_tiled(small_model, x, h, noise, seamed_tiles)
    assert abs(border_gradient_ratio(seamed, seamed_tiles, 8) - 1) > 0.05


def test_overlap_is_what_makes_tiles_agree(small_model):
    x = textured_image(128, 128, seed=3)
    h = small_model.condition_image(x)
    noise = draw_noise(small_model, 128, 128, torch.Generator().manual_seed(3))
    untiled = quantized(translate_tiled(small_model, x, h, noise, tile_grid(128, 128, None, 0, 8)))

    def share_within_2(overlap: int) -> float:
        tiles = tile_grid(128, 128, overlap + 32, overlap, 8)
        tiled = quantized(translate_tiled(small_model, x, h, noise, tiles))
        return ((tiled - untiled).abs() <= 2).float().mean().item()

    assert share_within_2(0) < 0.99
    assert share_within_2(64) >= 0.999


# Automatic sizes


def test_auto_tile_and_batch_follow_free_memory():
    config = preset("small")
    gib = 1 << 30

    assert auto_tile_size(config, "cpu", 64 * gib) == MAX_AUTO_TILE["cpu"]
    assert auto_tile_size(config, "cuda", 64 * gib) == MAX_AUTO_TILE["cuda"]
    assert auto_tile_size(config, "cpu", 40 << 20) == 192
    assert auto_tile_size(config, "cpu", 300 << 20) % config.size_multiple == 0
    assert auto_batch_size(config, 512, 1 << 20) == 1
    assert 1 < auto_batch_size(config, 512, 8 * gib) <= 16
