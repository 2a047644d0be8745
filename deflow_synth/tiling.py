"""Translating images of any size in overlapping tiles that agree with the untiled result.

Every random field of a translation (the condition noise on h, the dequantization noise on x
and the shift noise of every latent) is drawn once for the whole image and sliced per tile, so
a tile sees exactly the noise the untiled image would. Tiles start at multiples of the model's
``size_multiple``: a tile at (top, left) then owns the latent slice at (top / f, left / f) of
every latent with factor f, and the slice of h at (top / scale, left / scale). Each tile keeps
only its centre; neighbouring tiles meet in the middle of their overlap, where both are
furthest from a tile border. The result differs from the untiled one only where the flow's
receptive field reaches past the overlap.
"""

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import DeFlowConfig
from .model import CLEAN, DeFlow

__all__ = [
    "NoiseFields",
    "Tile",
    "auto_batch_size",
    "auto_tile_size",
    "bytes_per_pixel",
    "draw_noise",
    "rounded_tiling",
    "stitch",
    "tile_grid",
    "translate_tiled",
]

# Tile sides chosen from free memory stay within these bounds (model-resolution pixels): small
# tiles waste time on overlap, and on CPU tiles past 512 px are no faster per pixel.
MIN_AUTO_TILE = 192
MAX_AUTO_TILE = {"cpu": 512, "cuda": 1024}
# Share of the free memory a batch of tiles may take; the estimate below is rough.
MEMORY_SHARE = 0.25
MAX_AUTO_BATCH = 16
# Overlap between tiles when none is given, in model-resolution pixels (see the README).
DEFAULT_OVERLAP = 64


@dataclass(frozen=True)
class Tile:
    """A tile's region in the image and the centre part of it that goes into the result.

    All coordinates are image pixels; ``bottom`` and ``right`` are exclusive.
    """

    top: int
    bottom: int
    left: int
    right: int
    keep_top: int
    keep_bottom: int
    keep_left: int
    keep_right: int

    @property
    def size(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


@dataclass(frozen=True)
class NoiseFields:
    """Every random draw of one translation, shaped for the whole image.

    Arguments:
        cond: standard-normal noise on h, (B, 3, H / scale, W / scale).
        dequant: uniform [0, 1) dequantization noise on x, (B, 3, H, W).
        shift: standard-normal noise of the shift u of each latent, (B, C_i, H / f_i, W / f_i).
    """

    cond: Tensor
    dequant: Tensor
    shift: list[Tensor]

    def to(self, device: torch.device, non_blocking: bool = False) -> "NoiseFields":
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return NoiseFields(move(self.cond), move(self.dequant), [move(n) for n in self.shift])

    def pin_memory(self) -> "NoiseFields":
        return NoiseFields(
            self.cond.pin_memory(), self.dequant.pin_memory(), [n.pin_memory() for n in self.shift]
        )


def draw_noise(model: DeFlow, height: int, width: int, generator: torch.Generator) -> NoiseFields:
    """All noise fields for one (height, width) image, in a fixed order from ``generator``.

    Arguments:
        model: the model whose condition scale and latent shapes the fields follow.
        height, width: the flow image's size, multiples of ``model.config.size_multiple``.
        generator: a CPU generator; drawing on the CPU makes results independent of the device.
    """
    config = model.config
    scale = config.scale

    cond = torch.randn(
        (1, config.in_channels, height // scale, width // scale), generator=generator
    )
    dequant = torch.rand((1, config.in_channels, height, width), generator=generator)
    shift = [
        torch.randn((1, channels, height // factor, width // factor), generator=generator)
        for channels, factor in zip(model.latent_channels, model.latent_factors)
    ]

    return NoiseFields(cond, dequant, shift)


def axis_spans(
    length: int, tile: int, overlap: int, multiple: int
) -> list[tuple[int, int, int, int]]:
    """(start, stop, keep_start, keep_stop) of the tiles along one axis.

    As few tiles as fit with at least ``overlap`` between neighbours, all of one side (at most
    ``tile``) and spread evenly, starting at multiples of ``multiple``; neighbours split their
    overlap in the middle (rounded down to a multiple). Arguments are multiples of ``multiple``.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    count = -(-(length - overlap) // (tile - overlap))
    blocks, overlap_blocks = length // multiple, overlap // multiple
    side = -(-(blocks + (count - 1) * overlap_blocks) // count)
    starts = [i * (blocks - side) // (count - 1) * multiple for i in range(count)]
    side *= multiple

    # Seams go on block borders too, where the flow's own structure already has its edges.
    borders = [0]
    for start, next_start in itertools.pairwise(starts):
        borders.append((next_start + start + side) // (2 * multiple) * multiple)
    borders.append(length)

    return [(start, start + side, borders[i], borders[i + 1]) for i, start in enumerate(starts)]


def tile_grid(
    height: int, width: int, tile: int | None, overlap: int, multiple: int
) -> list[Tile]:
    """Overlapping tiles covering a (height, width) image, row by row.

    Arguments:
        height, width: image size, multiples of ``multiple``.
        tile: largest tile side; rounded down to a multiple of ``multiple``; None for one
            tile. Tiles are made as small as their count allows, to spare work on overlaps.
        overlap: overlap of neighbouring tiles; rounded up to a multiple of ``multiple``.
        multiple: every tile starts and ends at multiples of it.
    """
    if height % multiple or width % multiple:
        raise ValueError(f"image size: expected multiples of {multiple}, got {height}x{width}")
    if tile is None:
        tile, overlap = max(height, width), 0
    tile, overlap = rounded_tiling(tile, overlap, multiple)

    return [
        Tile(top, bottom, left, right, keep_top, keep_bottom, keep_left, keep_right)
        for top, bottom, keep_top, keep_bottom in axis_spans(height, tile, overlap, multiple)
        for left, right, keep_left, keep_right in axis_spans(width, tile, overlap, multiple)
    ]


def rounded_tiling(tile: int, overlap: int, multiple: int) -> tuple[int, int]:
    """Tile side rounded down and overlap rounded up to multiples of ``multiple``.

    Arguments:
        tile: the tile side asked for.
        overlap: the overlap asked for; it must stay below the tile side.
        multiple: the model's size multiple.
    """
    tile = max(multiple, tile // multiple * multiple)
    overlap = -(-overlap // multiple) * multiple
    if not 0 <= overlap < tile:
        raise ValueError(
            f"overlap: expected 0 <= overlap < tile after rounding to multiples of {multiple}, "
            f"got overlap {overlap} and tile {tile}"
        )

    return tile, overlap


def crop(field: Tensor, tile: Tile, factor: int) -> Tensor:
    """The part of a (B, C, H / factor, W / factor) field under the tile."""
    return field[
        :,
        :,
        tile.top // factor : tile.bottom // factor,
        tile.left // factor : tile.right // factor,
    ]


def stack_tiles(field: Tensor, tiles: list[Tile], factor: int = 1) -> Tensor:
    """The field's parts under each tile, stacked along the batch axis."""
    return torch.cat([crop(field, tile, factor) for tile in tiles])


def stitch(canvas: Tensor, outputs: Tensor, tiles: list[Tile]) -> None:
    """Copy the kept centre of each tile output (B, C, h, w) into ``canvas`` (1, C, H, W)."""
    for output, tile in zip(outputs, tiles):
        canvas[0, :, tile.keep_top : tile.keep_bottom, tile.keep_left : tile.keep_right] = output[
            :,
            tile.keep_top - tile.top : tile.keep_bottom - tile.top,
            tile.keep_left - tile.left : tile.keep_right - tile.left,
        ]


def batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Consecutive groups of at most ``batch_size`` tiles of equal size."""
    group: list[Tile] = []
    for tile in tiles:
        if group and (len(group) == batch_size or group[0].size != tile.size):
            yield group
            group = []
        group.append(tile)
    if group:
        yield group


@torch.no_grad()
def translate_tiled(
    model: DeFlow,
    x: Tensor,
    h: Tensor,
    noise: NoiseFields,
    tiles: list[Tile],
    temperature: float = 1.0,
    batch_size: int = 1,
) -> Tensor:
    """Clean x translated to the degraded domain (Eq. 8), tile by tile.

    Warning:
        Pixels within the flow's receptive field of a tile border differ slightly from the
        untiled result; a larger overlap makes the difference smaller.

    Arguments:
        model: the DeFlow model, in eval mode.
        x: the clean image (1, 3, H, W) in [0, 1], sides multiples of its ``size_multiple``.
        h: the condition image (1, 3, H / scale, W / scale).
        noise: every random field, drawn for the whole image (see :func:`draw_noise`).
        tiles: the grid from :func:`tile_grid`.
        temperature: scale of the random part of the shift u.
        batch_size: tiles translated together.
    """
    scale = model.config.scale
    factors = model.latent_factors
    canvas = torch.empty_like(x)

    for group in batches(tiles, batch_size):
        h_noise = stack_tiles(noise.cond, group, scale)
        cond = model.condition(stack_tiles(h, group, scale), noise=h_noise)
        shift_noise = [stack_tiles(n, group, f) for n, f in zip(noise.shift, factors)]

        y = model.translate(
            stack_tiles(x, group),
            cond,
            source=CLEAN,
            temperature=temperature,
            shift_noise=shift_noise,
            dequant_noise=stack_tiles(noise.dequant, group),
        )
        stitch(canvas, y, group)

    return canvas


def bytes_per_pixel(config: DeFlowConfig) -> int:
    """Rough peak memory of a translation per model-resolution pixel.

    Fitted to measurements of the small and ntire-x4 presets on 256-512 px tiles (CPU, float32):
    about one float per condition channel and per coupling channel, plus a fixed part.
    """
    return 4 * (config.cond_channels + config.coupling_hidden + 24)


def auto_tile_size(config: DeFlowConfig, device: str, free_bytes: int) -> int:
    """A tile side that fits a quarter of ``free_bytes``, a multiple of ``size_multiple``.

    Arguments:
        config: the model configuration.
        device: ``"cpu"`` or ``"cuda"``.
        free_bytes: memory available on the device.
    """
    multiple = config.size_multiple
    side = int(math.sqrt(MEMORY_SHARE * free_bytes / bytes_per_pixel(config)))
    side = min(max(side, MIN_AUTO_TILE), MAX_AUTO_TILE[device])

    return max(multiple, side // multiple * multiple)


def auto_batch_size(config: DeFlowConfig, tile: int, free_bytes: int) -> int:
    """How many tiles of side ``tile`` fit a quarter of ``free_bytes`` (at least 1)."""
    per_tile = bytes_per_pixel(config) * tile * tile
    return int(min(max(MEMORY_SHARE * free_bytes // per_tile, 1), MAX_AUTO_BATCH))
