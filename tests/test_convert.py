"""Tests of deflow_synth.convert: the folder pipeline from clean photos to LR/HR pairs."""

import json
import os
import unicodedata
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deflow_synth import __version__
from deflow_synth import convert as convert_module
from deflow_synth._basicsr import imresize
from deflow_synth.checkpoint import file_sha256, save_model
from deflow_synth.config import preset
from deflow_synth.convert import (
    DegradeOptions,
    ModelInfo,
    Pair,
    degrade_folder,
    image_seed,
    list_images,
    load_for_degrade,
    output_names,
    parse_shard,
    shard_of,
)
from deflow_synth.errors import DeflowError
from deflow_synth.imageio import read_image

from .test_tiling import realistic_model

TINY = preset(
    "small",
    n_coupling_steps=1,
    encoder_blocks=1,
    stacked_blocks=(0,),
    encoder_features=8,
    coupling_hidden=8,
)
ODD_NAME = "sub/été photo.jpg"
GOOD = ["a.png", "gray.png", ODD_NAME]


@pytest.fixture(scope="module")
def model():
    return realistic_model(TINY)


@pytest.fixture(scope="module")
def info(model):
    return ModelInfo("tiny", "tiny.pt", "0" * 64, model.config.to_dict())


def photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 3, y * 2, (x + y) * 2], axis=2) % 256
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three usable images (one with an odd size and name) and four bad files."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(photo(48, 64, 0)).save(folder / "a.png")
    Image.fromarray(photo(36, 40, 1)[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(photo(157, 203, 2)).save(folder / ODD_NAME, quality=95)
    Image.fromarray(photo(20, 20, 3)).save(folder / "tiny.png")
    Image.fromarray(photo(8, 8, 4)).save(folder / ".hidden.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.jpg").write_bytes((folder / ODD_NAME).read_bytes()[:300])
    (folder / "notes.txt").write_text("not a photo")

    return folder


def options(**changes) -> DegradeOptions:
    return replace(DegradeOptions(tile=32, overlap=16, workers=0), **changes)


def run(photos, out, model, info, **changes):
    results = []
    summary = degrade_folder(
        photos, out, model, info, options(**changes), on_result=results.append
    )
    return summary, {r.source: r for r in results}


def lr_bytes(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "lr").rglob("*.png"))
    }


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# Names, seeds and shards


def test_list_images_skips_hidden_names_and_the_output_folder(tmp_path):
    for name in ["b.png", "a/c.jpg", ".git/x.png", "a/.d.png", "out/hr/e.png", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    assert list_images(tmp_path, exclude=tmp_path / "out") == ["a/c.jpg", "b.png", "notes.txt"]
    with pytest.raises(DeflowError, match="input folder not found"):
        list_images(tmp_path / "missing")


def test_output_names_handle_samples_collisions_and_flat_folders():
    sources = ["a/b.jpg", "a/b.png", "c.tif", "a__b.png"]

    assert output_names(sources, "png", 1, flat=False) == [
        Pair("a/b.jpg", ("a/b.jpg.png",)),
        Pair("a/b.png", ("a/b.png.png",)),
        Pair("c.tif", ("c.png",)),
        Pair("a__b.png", ("a__b.png",)),
    ]
    assert output_names(["c.tif"], "png", 2, flat=False) == [
        Pair("c.tif", ("c_s0.png", "c_s1.png"))
    ]
    flat = output_names(["x/y/z.jpg", "x/y/w.png"], "tiff", 1, flat=True)
    assert flat == [Pair("x/y/z.jpg", ("x__y__z.tiff",)), Pair("x/y/w.png", ("x__y__w.tiff",))]
    with pytest.raises(DeflowError, match=r"a\.png\.png and a\.png would both be written"):
        output_names(["a.png", "a.jpg", "a.png.png"], "png", 1, flat=False)


def test_image_seed_depends_on_seed_path_and_sample_only():
    seed = image_seed(0, "a/b.png", 0)

    assert seed == image_seed(0, "a/b.png", 0)
    assert 0 <= seed < 2**63
    assert len({seed, image_seed(1, "a/b.png", 0), image_seed(0, "a/c.png", 0)}) == 3
    assert seed != image_seed(0, "a/b.png", 1)
    # The same name typed on macOS (decomposed accents) and Linux gives the same seed.
    nfd = unicodedata.normalize("NFD", "é.png")
    assert image_seed(0, nfd, 0) == image_seed(0, unicodedata.normalize("NFC", "é.png"), 0)


def test_shards_split_every_path_exactly_once():
    paths = [f"folder/{i}.png" for i in range(200)]
    shards = [[p for p in paths if shard_of(p, 4) == index] for index in range(4)]

    assert sorted(p for shard in shards for p in shard) == sorted(paths)
    assert all(30 < len(shard) < 70 for shard in shards)
    assert parse_shard("2/4") == (2, 4)
    for bad in ["4/4", "-1/4", "1", "a/b"]:
        with pytest.raises(DeflowError, match="--shard"):
            parse_shard(bad)


# A whole folder


def test_degrade_folder_writes_basicsr_pairs(photos, tmp_path, model, info):
    out = tmp_path / "pairs"

    summary, results = run(photos, out, model, info)

    assert {s: r.status for s, r in results.items()} == {
        "a.png": "done",
        "gray.png": "done",
        ODD_NAME: "done",
        "tiny.png": "skipped",
        "notes.txt": "skipped",
        "empty.png": "failed",
        "broken.jpg": "failed",
    }
    assert (summary.done, summary.skipped, summary.failed) == (3, 2, 2)
    assert "smaller than the minimum of 32x32 px" in results["tiny.png"].message
    assert "empty file" in results["empty.png"].message
    assert "broken.jpg" in results["broken.jpg"].message

    # HR is the input cropped (not resized) to a multiple of the scale; LR is exactly 1/4.
    for source, name, crop in [
        ("a.png", "a.png", (48, 64)),
        ("gray.png", "gray.png", (36, 40)),
        (ODD_NAME, "sub/été photo.png", (156, 200)),
    ]:
        hr, lr = read_image(out / "hr" / name), read_image(out / "lr" / name)
        assert hr.shape[:2] == crop
        assert lr.shape[:2] == (crop[0] // 4, crop[1] // 4)
        np.testing.assert_array_equal(hr, read_image(photos / source)[: crop[0], : crop[1]])
        # The degradation is visible but the LR image still shows the photo.
        clean = np.clip(imresize(hr, 1 / 4), 0, 1)
        assert 1 / 255 < np.abs(lr - clean).mean() < 20 / 255

    meta = (out / "meta_info.txt").read_text(encoding="utf-8").splitlines()
    assert meta == ["a.png (48,64,3)", "gray.png (36,40,3)", "sub/été photo.png (156,200,3)"]

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["version"] == __version__
    assert manifest["model"]["id"] == "tiny" and manifest["model"]["sha256"] == "0" * 64
    assert manifest["options"]["seed"] == 0 and manifest["options"]["scale"] == 4
    odd = next(p for p in manifest["pairs"] if p["source"] == ODD_NAME)
    assert odd["seeds"] == [image_seed(0, ODD_NAME, 0)]
    assert odd["crop"] == [0, 0, 200, 156] and odd["input_size"] == [203, 157]
    assert odd["lr_size"] == [50, 39]
    assert not leftovers(out)


def test_results_depend_only_on_seed_and_path(photos, tmp_path, model, info):
    run(photos, tmp_path / "one", model, info)
    reference = lr_bytes(tmp_path / "one")

    # Two shards with a worker process, after a new image was added to the folder.
    Image.fromarray(photo(40, 40, 9)).save(photos / "added.png")
    for index in range(2):
        run(photos, tmp_path / "two", model, info, shard=(index, 2), workers=1)
    sharded = lr_bytes(tmp_path / "two")

    assert set(sharded) == set(reference) | {"lr/added.png"}
    assert all(sharded[name] == data for name, data in reference.items())

    run(photos, tmp_path / "seed", model, info, seed=1)
    assert lr_bytes(tmp_path / "seed")["lr/a.png"] != reference["lr/a.png"]


def test_tiled_and_untiled_runs_agree(photos, tmp_path, model, info):
    run(photos, tmp_path / "tiled", model, info, tile=32, overlap=16)
    run(photos, tmp_path / "whole", model, info, tile=0)

    for name in ["a.png", "sub/été photo.png"]:
        tiled = read_image(tmp_path / "tiled" / "lr" / name) * 255
        whole = read_image(tmp_path / "whole" / "lr" / name) * 255
        assert tiled.shape == whole.shape
        assert (np.abs(tiled - whole) <= 2.01).mean() >= 0.999

    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text(encoding="utf-8"))
    assert {p["tile"] for p in manifest["pairs"]} == {None}


def test_samples_are_independent_and_share_their_hr_file(photos, tmp_path, model, info):
    out = tmp_path / "pairs"

    run(photos, out, model, info, samples=2)

    first, second = out / "lr" / "a_s0.png", out / "lr" / "a_s1.png"
    assert first.read_bytes() != second.read_bytes()
    assert os.path.samefile(out / "hr" / "a_s0.png", out / "hr" / "a_s1.png")
    meta = (out / "meta_info.txt").read_text(encoding="utf-8").splitlines()
    assert meta[:2] == ["a_s0.png (48,64,3)", "a_s1.png (48,64,3)"]


def test_flat_output(photos, tmp_path, model, info):
    out = tmp_path / "pairs"

    summary, _ = run(photos, out, model, info, flat=True, image_format="bmp")

    assert sorted(p.name for p in (out / "lr").iterdir()) == [
        "a.bmp",
        "gray.bmp",
        "sub__été photo.bmp",
    ]
    assert not summary.subfolders


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_tiles_and_agrees_with_the_cpu(photos, tmp_path, model, info):
    gpu_model = realistic_model(TINY).to("cuda")

    run(photos, tmp_path / "cpu", model, info)
    summary, _ = run(photos, tmp_path / "gpu", gpu_model, info, device="cuda", batch_size=None)

    assert summary.done == 3
    for name in ["a.png", "sub/été photo.png"]:
        on_cpu = read_image(tmp_path / "cpu" / "lr" / name) * 255
        on_gpu = read_image(tmp_path / "gpu" / "lr" / name) * 255
        assert (np.abs(on_cpu - on_gpu) <= 1.01).mean() >= 0.999


# Resume, interruption and failures


def test_rerun_skips_finished_pairs_and_overwrite_redoes_them(photos, tmp_path, model, info):
    out = tmp_path / "pairs"
    run(photos, out, model, info)
    reference = lr_bytes(out)
    times = {p: p.stat().st_mtime_ns for p in (out / "lr").rglob("*.png")}

    summary, results = run(photos, out, model, info)
    assert (summary.done, summary.resumed) == (0, 3)
    assert {p: p.stat().st_mtime_ns for p in times} == times

    (out / "lr" / "a.png").unlink()
    summary, results = run(photos, out, model, info)
    assert results["a.png"].status == "done" and summary.resumed == 2
    assert lr_bytes(out) == reference

    summary, _ = run(photos, out, model, info, overwrite=True)
    assert summary.done == 3
    assert lr_bytes(out) == reference


def test_output_folder_inside_the_input_is_left_out(photos, model, info):
    summary, results = run(photos, photos / "pairs", model, info)
    again, _ = run(photos, photos / "pairs", model, info)

    assert summary.done == 3 and again.resumed == 3 and again.done == 0
    assert not any(source.startswith("pairs/") for source in results)
    with pytest.raises(DeflowError, match="must not be the input folder"):
        run(photos, photos, model, info)


def test_other_settings_are_refused_without_overwrite(photos, tmp_path, model, info):
    out = tmp_path / "pairs"
    run(photos, out, model, info)

    with pytest.raises(DeflowError, match="other settings.*--overwrite"):
        run(photos, out, model, info, seed=5)
    summary, _ = run(photos, out, model, info, seed=5, overwrite=True)
    assert summary.done == 3


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupt_leaves_only_whole_pairs(photos, tmp_path, model, info, workers):
    out = tmp_path / "pairs"

    def interrupt(result):
        if result.status == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        degrade_folder(photos, out, model, info, options(workers=workers), on_result=interrupt)

    assert not leftovers(out)
    hr = sorted(p.relative_to(out / "hr") for p in (out / "hr").rglob("*.png"))
    lr = sorted(p.relative_to(out / "lr") for p in (out / "lr").rglob("*.png"))
    assert hr == lr and len(hr) <= 1
    meta = (out / "meta_info.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(" (")[0] for line in meta] == [p.as_posix() for p in hr]

    summary, _ = run(photos, out, model, info)
    assert summary.done + summary.resumed == 3
    run(photos, tmp_path / "reference", model, info)
    assert lr_bytes(out) == lr_bytes(tmp_path / "reference")


def test_a_failing_image_is_removed_and_the_rest_carries_on(
    photos, tmp_path, model, info, monkeypatch
):
    real = convert_module.degrade_image

    def flaky(model, prepared, seeds, *args):
        if seeds == [image_seed(0, "gray.png", 0)]:
            raise RuntimeError("simulated model failure")
        return real(model, prepared, seeds, *args)

    monkeypatch.setattr(convert_module, "degrade_image", flaky)
    out = tmp_path / "pairs"

    summary, results = run(photos, out, model, info)

    assert results["gray.png"].status == "failed"
    assert "gray.png: error while degrading" in results["gray.png"].message
    assert "simulated model failure" in results["gray.png"].message
    assert not (out / "hr" / "gray.png").exists()
    assert summary.done == 2


# The model


def test_load_for_degrade_reads_a_checkpoint_and_its_card(tmp_path, model):
    path = tmp_path / "model.pt"
    save_model(model, path, {"id": "camera-7"})

    loaded, loaded_info = load_for_degrade(path, None, "cpu")

    assert loaded_info.id == "camera-7"
    assert loaded_info.sha256 == file_sha256(path)
    assert loaded_info.config == model.config.to_dict()
    assert not loaded.training


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFLOW_SYNTH_MODEL", str(tmp_path / "nowhere.pt"))

    with pytest.raises(DeflowError, match=r"default model is missing .*nowhere\.pt.*--model"):
        load_for_degrade(None, None, "cpu")


def test_changed_samples_or_format_are_refused_without_overwrite(photos, tmp_path, model, info):
    out = tmp_path / "pairs"
    run(photos, out, model, info)

    with pytest.raises(DeflowError, match="other settings"):
        run(photos, out, model, info, samples=2)
    with pytest.raises(DeflowError, match="other settings"):
        run(photos, out, model, info, image_format="bmp")


def test_input_inside_the_output_folder_is_refused(photos, model, info):
    run(photos, photos.parent / "nest", model, info)

    with pytest.raises(DeflowError, match="inside the output folder"):
        run(photos.parent / "nest" / "hr", photos.parent / "nest", model, info)


def test_empty_input_and_unwritable_output_are_explained(tmp_path, photos, model, info):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeflowError, match="holds no files"):
        run(tmp_path / "empty", tmp_path / "out", model, info)

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DeflowError, match="cannot write"):
        run(photos, blocker, model, info)
