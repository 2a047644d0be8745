"""Tests of examples/: the sample images, the BasicSR options file and its training script."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deflow_synth._basicsr import import_basicsr

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OPTIONS = EXAMPLES / "train_rrdbnet_x4.yml"


def load_options() -> dict:
    return yaml.safe_load(OPTIONS.read_text())


def make_pairs(root: Path, scale: int = 4, size: int = 64, count: int = 2) -> None:
    """A tiny folder in the layout of `deflow-synth degrade`: hr/, lr/ and meta_info.txt."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        name = f"photo{index}.png"
        hr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        lr = hr.reshape(size // scale, scale, size // scale, scale, 3).mean(axis=(1, 3))
        for folder, image in (("hr", hr), ("lr", lr.astype(np.uint8))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / folder / name)
        lines.append(f"{name} ({size},{size},3)\n")
    (root / "meta_info.txt").write_text("".join(lines))


def test_example_images_are_small_clean_pngs_with_a_licence():
    images = sorted((EXAMPLES / "images").iterdir())
    licence = (EXAMPLES / "LICENSE-IMAGES.md").read_text()

    assert len(images) == 3
    for path in images:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert all(side % 16 == 0 and 256 <= side <= 384 for side in image.size)
        assert path.stat().st_size < 300_000
        assert f"images/{path.name}" in licence


def test_options_point_to_the_degrade_layout():
    options = load_options()
    train = options["datasets"]["train"]

    assert options["model_type"] == "SRModel" and options["scale"] == 4
    assert options["network_g"]["type"] == "RRDBNet"
    assert options["network_g"]["scale"] == options["scale"]
    assert train["type"] == "PairedImageDataset"
    output = Path(train["dataroot_gt"]).parent
    assert Path(train["dataroot_gt"]) == output / "hr"
    assert Path(train["dataroot_lq"]) == output / "lr"
    assert Path(train["meta_info_file"]) == output / "meta_info.txt"
    assert train["gt_size"] % options["scale"] == 0
    # The Makefile's demo writes the folder the options read.
    assert f"degrade examples/images {output}" in (EXAMPLES.parent / "Makefile").read_text()


@pytest.mark.parametrize("with_meta_info", [True, False])
def test_basicsr_paired_dataset_reads_the_layout(tmp_path, with_meta_info):
    make_pairs(tmp_path)
    train = load_options()["datasets"]["train"]
    options = {
        **train,
        "dataroot_gt": str(tmp_path / "hr"),
        "dataroot_lq": str(tmp_path / "lr"),
        "meta_info_file": str(tmp_path / "meta_info.txt") if with_meta_info else None,
        "gt_size": 32,
        "phase": "train",
        "scale": 4,
    }

    dataset_module = import_basicsr("data.paired_image_dataset")
    dataset = dataset_module.PairedImageDataset(options)
    item = dataset[1]

    assert len(dataset) == 2
    assert tuple(item["gt"].shape) == (3, 32, 32)
    assert tuple(item["lq"].shape) == (3, 8, 8)
    assert Path(item["gt_path"]).name == Path(item["lq_path"]).name
    assert Path(item["gt_path"]).name in {"photo0.png", "photo1.png"}


@pytest.mark.slow
def test_basicsr_train_script_runs_two_iterations_on_cpu(tmp_path):
    make_pairs(tmp_path / "pairs")
    overrides = [
        "num_gpu=0",
        "train:total_iter=2",
        "network_g:num_block=1",
        "datasets:train:gt_size=32",
        "datasets:train:batch_size_per_gpu=2",
        "datasets:train:num_worker_per_gpu=0",
        f"datasets:train:dataroot_gt={tmp_path / 'pairs' / 'hr'}",
        f"datasets:train:dataroot_lq={tmp_path / 'pairs' / 'lr'}",
        f"datasets:train:meta_info_file={tmp_path / 'pairs' / 'meta_info.txt'}",
    ]
    command = [sys.executable, str(EXAMPLES / "basicsr_train.py"), "-opt", str(OPTIONS)]

    result = subprocess.run(
        [*command, "--force_yml", *overrides],
        check=False,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = tmp_path / "experiments" / load_options()["name"]
    assert (run / "models" / "net_g_latest.pth").is_file()
