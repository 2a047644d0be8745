"""The shipped default model: it loads, carries its card, and degrades an example photo into
pairs that BasicSR reads."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deflow_synth._basicsr import import_basicsr, imresize
from deflow_synth.checkpoint import default_model_path, load_model, read_card
from deflow_synth.cli import app
from deflow_synth.imageio import read_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
MAX_SHIPPED_BYTES = 20 * 2**20


def test_shipped_model_is_small_and_carries_its_card():
    path = default_model_path()

    assert path.stat().st_size <= MAX_SHIPPED_BYTES
    card = read_card(path)
    for key in ("command", "steps", "train_seconds", "final_nll_bits_per_dim", "licence",
                "evaluation", "counts"):
        assert key in card, key
    assert set(card["final_nll_bits_per_dim"]) == {"clean", "degraded"}
    model = load_model(path)
    assert model.config.scale == 4
    assert all(shift.matrix.abs().max() > 0.05 for shift in model.shifts)


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    photos = root / "photos"
    photos.mkdir()
    (photos / "coffee.png").write_bytes((EXAMPLES / "coffee.png").read_bytes())

    result = CliRunner().invoke(
        app, ["degrade", str(photos), str(root / "pairs"), "--device", "cpu", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    return root / "pairs"


def test_shipped_model_degrades_an_example_photo(demo_pairs):
    hr = read_image(demo_pairs / "hr" / "coffee.png")
    lr = read_image(demo_pairs / "lr" / "coffee.png")
    bicubic = np.clip(imresize(hr.astype(np.float64), 0.25), 0, 1)

    assert lr.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
    residual = lr - bicubic
    # A learned degradation: visibly more than rounding, far less than a different picture.
    assert 1.5 / 255 < residual.std() < 25 / 255
    assert abs(residual.mean()) < 10 / 255


def test_pairs_load_with_basicsr_paired_dataset(demo_pairs):
    options = {
        "name": "demo",
        "type": "PairedImageDataset",
        "dataroot_gt": str(demo_pairs / "hr"),
        "dataroot_lq": str(demo_pairs / "lr"),
        "meta_info_file": str(demo_pairs / "meta_info.txt"),
        "filename_tmpl": "{}",
        "io_backend": {"type": "disk"},
        "gt_size": 64,
        "use_hflip": True,
        "use_rot": True,
        "phase": "train",
        "scale": 4,
    }
    dataset = import_basicsr("data.paired_image_dataset").PairedImageDataset(options)

    item = dataset[0]

    assert len(dataset) == 1
    assert tuple(item["gt"].shape) == (3, 64, 64)
    assert tuple(item["lq"].shape) == (3, 16, 16)


def test_shipped_model_tiles_without_seams():
    from .test_tiling import assert_tiles_match_untiled, textured_image

    model = load_model(default_model_path())

    assert_tiles_match_untiled(model, textured_image(512, 512, seed=5), seed=0)


def test_shipped_model_tiles_a_photo_like_the_whole_image():
    import torch

    from deflow_synth.tiling import draw_noise, tile_grid, translate_tiled

    from .test_tiling import border_gradient_ratio, quantized

    model = load_model(default_model_path())
    photo = read_image(EXAMPLES / "astronaut.png")[:384, :384]
    photo = np.pad(photo, ((0, 128), (0, 128), (0, 0)), mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None]
    h = model.condition_image(x)
    noise = draw_noise(model, 512, 512, torch.Generator().manual_seed(0))
    tiles = tile_grid(512, 512, 192, 64, 8)

    untiled = translate_tiled(model, x, h, noise, tile_grid(512, 512, None, 0, 8))
    tiled = translate_tiled(model, x, h, noise, tiles)

    assert ((quantized(tiled) - quantized(untiled)).abs() <= 2).float().mean() >= 0.999
    # The flow's 8-pixel blocks show on a photo with or without tiling; tiling adds nothing.
    seams = border_gradient_ratio(tiled, tiles, 8)
    assert abs(seams - border_gradient_ratio(untiled, tiles, 8)) <= 0.01
