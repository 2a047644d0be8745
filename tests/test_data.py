"""Tests of deflow_synth.data: folders, the cache at model resolution, and patches."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deflow_synth._basicsr import imresize
from deflow_synth.data import (
    CachedImage,
    PatchSampler,
    cache_images,
    cache_pairs,
    color_statistics,
    condition_images,
    list_images,
    match_pairs,
    shard,
    split_held_out,
)
from deflow_synth.errors import DeflowError


def random_rgb(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# Folders


def test_list_images_sorts_recurses_and_reports_other_files(tmp_path):
    save(tmp_path / "b.png", Image.fromarray(random_rgb((8, 8))))
    save(tmp_path / "sub" / "a.JPG", Image.fromarray(random_rgb((8, 8))))
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / ".hidden.png").write_bytes(b"")

    images, others = list_images(tmp_path, "clean")

    assert images == [tmp_path / "b.png", tmp_path / "sub" / "a.JPG"]
    (other,) = others
    assert str(other) == f"{tmp_path / 'notes.txt'}: not an image file (suffix '.txt')"


def test_list_images_refuses_missing_and_empty_folders(tmp_path):
    with pytest.raises(DeflowError, match=rf"clean folder {tmp_path / 'nope'} does not exist"):
        list_images(tmp_path / "nope", "clean")

    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DeflowError, match=rf"degraded folder {tmp_path} holds no images"):
        list_images(tmp_path, "degraded")


def test_match_pairs_by_relative_name_ignoring_the_suffix(tmp_path):
    hr = [tmp_path / "hr" / "a.png", tmp_path / "hr" / "s" / "b.png", tmp_path / "hr" / "c.png"]
    lr = [tmp_path / "lr" / "a.jpg", tmp_path / "lr" / "s" / "b.png", tmp_path / "lr" / "d.png"]

    pairs, unmatched = match_pairs(hr, tmp_path / "hr", lr, tmp_path / "lr")

    assert pairs == [(hr[0], lr[0]), (hr[1], lr[1])]
    assert [s.path for s in unmatched] == [hr[2], lr[2]]
    assert "no LR image of the same name" in unmatched[0].reason


# Cache


def test_clean_images_are_cached_downsampled_with_matlab_bicubic(tmp_path):
    pixels = random_rgb((40, 24))
    source = save(tmp_path / "in" / "photo.png", Image.fromarray(pixels))

    images, skipped = cache_images([source], 4, tmp_path / "cache", min_side=4)

    assert skipped == []
    (image,) = images
    assert (image.height, image.width) == (10, 6)
    expected = np.clip(imresize(pixels.astype(np.float32) / 255, 1 / 4), 0, 1)
    np.testing.assert_allclose(image.load(), expected, atol=1 / 65535)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    source = save(tmp_path / "in" / "photo.png", Image.fromarray(random_rgb((16, 16))))
    (first,), _ = cache_images([source], 1, tmp_path / "cache", min_side=4)
    stamp = first.array.stat().st_mtime_ns

    (again,), _ = cache_images([source], 1, tmp_path / "cache", min_side=4)
    assert again.array == first.array and again.array.stat().st_mtime_ns == stamp

    save(source, Image.fromarray(random_rgb((16, 16), seed=1)))
    (changed,), _ = cache_images([source], 1, tmp_path / "cache", min_side=4)
    assert changed.array != first.array
    np.testing.assert_allclose(changed.load(), random_rgb((16, 16), seed=1) / 255, atol=1e-4)


def test_parallel_preparation_gives_the_same_cache(tmp_path):
    sources = [save(tmp_path / "in" / f"{i}.png", Image.fromarray(random_rgb((32, 32), i)))
               for i in range(3)]

    serial, _ = cache_images(sources, 2, tmp_path / "serial", min_side=4, jobs=1)
    parallel, _ = cache_images(sources, 2, tmp_path / "parallel", min_side=4, jobs=2)

    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a.load(), b.load())


def test_unusual_images_are_converted_with_a_note(tmp_path, caplog):
    gray = save(tmp_path / "gray.png", Image.fromarray(random_rgb((16, 16))[:, :, 0]))
    rgba = np.dstack([random_rgb((16, 16)), np.full((16, 16), 128, np.uint8)])
    alpha = save(tmp_path / "alpha.png", Image.fromarray(rgba))
    deep = save(tmp_path / "deep.png", Image.fromarray(np.full((16, 16), 40000, np.uint16)))
    cmyk = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))

    with caplog.at_level(logging.WARNING, logger="deflow_synth"):
        images, skipped = cache_images([gray, alpha, deep, cmyk], 1, tmp_path / "c", 8)

    assert skipped == [] and len(images) == 4
    notes = {record.getMessage() for record in caplog.records}
    assert f"{gray}: grayscale, repeated over R, G and B" in notes
    assert f"{alpha}: transparency composited over white" in notes
    assert any(n.startswith(f"{deep}: 16-bit") for n in notes)
    assert f"{cmyk}: CMYK, converted to RGB" in notes

    by_name = {image.source.name: image.load() for image in images}
    assert by_name["gray.png"].shape == (16, 16, 3)
    np.testing.assert_allclose(by_name["deep.png"], 40000 / 65535, atol=1e-4)
    np.testing.assert_allclose(by_name["cmyk.jpg"][..., 0], 1.0, atol=0.05)
    np.testing.assert_allclose(by_name["cmyk.jpg"][..., 1:], 0.0, atol=0.05)


def test_unreadable_and_small_images_are_skipped_with_their_reason(tmp_path):
    good = save(tmp_path / "good.png", Image.fromarray(random_rgb((64, 64))))
    small = save(tmp_path / "small.png", Image.fromarray(random_rgb((64, 20))))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")

    images, skipped = cache_images([good, small, empty, broken], 2, tmp_path / "c", 16)

    assert [image.source for image in images] == [good]
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons["small.png"] == "10x32 px after downsampling by 2, smaller than the 16-px patch"
    assert "empty" in reasons["empty.png"]
    assert "broken.jpg" in str(next(s for s in skipped if s.path == broken))
    assert len(reasons) == 3


def test_pairs_must_match_in_size_after_downsampling(tmp_path):
    hr = [save(tmp_path / "hr" / f"{i}.png", Image.fromarray(random_rgb((64, 64), i)))
          for i in range(2)]
    lr = [save(tmp_path / "lr" / "0.png", Image.fromarray(random_rgb((16, 16)))),
          save(tmp_path / "lr" / "1.png", Image.fromarray(random_rgb((16, 20))))]

    pairs, skipped = cache_pairs(list(zip(hr, lr, strict=True)), 4, tmp_path / "c", 8)

    assert [(x.source, y.source) for x, y in pairs] == [(hr[0], lr[0])]
    assert skipped[0].path == lr[1]
    assert "20x16 px, but its HR partner 1.png downsampled by 4 is 16x16 px" in skipped[0].reason


# Splits and statistics


def test_held_out_images_are_evenly_spaced_and_only_when_enough_remain():
    training, held = split_held_out(list(range(20)), 0.1, 4, 3)
    assert held == [5, 15] and len(training) == 18

    assert split_held_out(list(range(5)), 0.1, 4, 3) == (list(range(5)), [])
    assert split_held_out(list(range(100)), 0.1, 4, 3)[1] == [12, 37, 62, 87]


def test_shard_splits_items_between_ranks_unless_too_few():
    assert shard(list(range(5)), 1, 2) == [1, 3]
    assert shard([0], 1, 2) == [0]


def test_color_statistics_over_every_pixel(tmp_path):
    pixels = [random_rgb((8, 8), 0), random_rgb((4, 12), 1)]
    sources = [save(tmp_path / f"{i}.png", Image.fromarray(p)) for i, p in enumerate(pixels)]
    images, _ = cache_images(sources, 1, tmp_path / "c", 1)

    mean, std = color_statistics(images)

    values = np.concatenate([p.reshape(-1, 3) / 255 for p in pixels])
    np.testing.assert_allclose(mean, values.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, values.std(0), atol=1e-5)


# Patches


@pytest.fixture
def cached(tmp_path) -> list[CachedImage]:
    sources = [save(tmp_path / f"{i}.png", Image.fromarray(random_rgb((24, 40), i)))
               for i in range(3)]
    return cache_images(sources, 1, tmp_path / "cache", 8)[0]


def test_patches_are_a_pure_function_of_seed_step_and_rank(cached):
    sampler = PatchSampler([[image] for image in cached], 8, seed=3, stream=0)

    (first,) = sampler.draw(step=5, count=6)
    (again,) = PatchSampler([[image] for image in cached], 8, seed=3, stream=0).draw(5, 6)

    assert first.shape == (6, 8, 8, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, sampler.draw(step=6, count=6)[0])
    assert not np.array_equal(first, sampler.draw(step=5, count=6, rank=1)[0])
    assert not np.array_equal(first, PatchSampler([[i] for i in cached], 8, 4, 0).draw(5, 6)[0])


def test_every_patch_is_a_crop_of_an_image_possibly_flipped(cached):
    (patches,) = PatchSampler([[image] for image in cached], 8, seed=0, stream=0).draw(0, 40)
    images = [image.load() for image in cached]

    def found(patch):
        for image in images:
            for candidate in (patch, patch[::-1], patch[:, ::-1], patch[::-1, ::-1]):
                windows = np.lib.stride_tricks.sliding_window_view(image, (8, 8, 3))
                if (np.abs(windows - candidate).max(axis=(-3, -2, -1)) == 0).any():
                    return True
        return False

    assert all(found(patch) for patch in patches)


def test_paired_groups_share_the_crop_and_flips(cached):
    sampler = PatchSampler([(cached[0], cached[0])], 8, seed=1, stream=2)

    x, y = sampler.draw(0, 10)

    np.testing.assert_array_equal(x, y)


def test_condition_images_are_the_patches_downsampled(cached):
    (patches,) = PatchSampler([[cached[0]]], 16, seed=0, stream=0).draw(0, 2)

    h = condition_images(patches, 4)

    assert h.shape == (2, 4, 4, 3) and h.dtype == np.float32
    np.testing.assert_allclose(h[1], imresize(patches[1], 1 / 4), atol=1e-6)


def test_patches_keep_the_8x8_block_grid(tmp_path):
    rows, columns = np.meshgrid(np.arange(61), np.arange(77), indexing="ij")
    block_id = (rows // 8) * 10 + columns // 8
    image = np.repeat(block_id[:, :, None], 3, axis=2).astype(np.uint16)
    path = tmp_path / "grid.npy"
    np.save(path, image)
    cached = CachedImage(source=tmp_path / "grid.png", array=path, height=61, width=77)

    (patches,) = PatchSampler([[cached]], 16, seed=0, stream=0, alignment=8).draw(0, 30)

    blocks = patches[:, :, :, 0].reshape(30, 2, 8, 2, 8)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
