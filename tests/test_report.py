"""Tests of the folder comparison behind ``deflow-synth inspect``: report, figure, command."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deflow_synth import report as report_module
from deflow_synth.chart import report_figure
from deflow_synth.cli import app
from deflow_synth.errors import DeflowError

SIZE = 64


def photo(seed: int) -> np.ndarray:
    """A smooth random picture in [0.15, 0.85]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    phases = rng.uniform(0, 2 * np.pi, 3)
    channels = [0.5 + 0.3 * np.sin(2 * x + 3 * y + phase) for phase in phases]

    return np.stack(channels, axis=2)


def save(path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    """generated/ (noise 4 levels), clean/ (their clean versions), real/ (noise 8 levels)."""
    rng = np.random.default_rng(0)
    for index in range(3):
        clean = photo(index)
        save(tmp_path / "clean" / f"img{index}.png", clean)
        save(
            tmp_path / "generated" / f"img{index}.png", clean + rng.normal(0, 4 / 255, clean.shape)
        )
        other = photo(10 + index)
        save(tmp_path / "real" / f"other{index}.png", other + rng.normal(0, 8 / 255, other.shape))

    return tmp_path


def test_folders_are_measured_and_compared(folders):
    generated = report_module.measure_folder(folders / "generated", "generated", folders / "clean")
    real = report_module.measure_folder(folders / "real", "real")

    report = report_module.build_report(generated, real)
    noise_generated = np.asarray(report["generated"]["estimated"]["channel_std"]) * 255
    noise_real = np.asarray(report["real"]["estimated"]["channel_std"]) * 255
    noise_paired = np.asarray(report["generated"]["paired"]["channel_std"]) * 255

    assert report["generated"]["estimated"]["images"] == 3
    assert report["real"]["paired"] is None
    np.testing.assert_allclose(noise_generated, 4, rtol=0.25)
    np.testing.assert_allclose(noise_real, 8, rtol=0.25)
    np.testing.assert_allclose(noise_paired, np.sqrt(16 + 1 / 12), rtol=0.1)
    assert report["distance"]["noise"] == pytest.approx(np.log(2), rel=0.3)


def test_bad_files_are_reported_and_the_rest_carries_on(folders):
    (folders / "generated" / "broken.png").write_bytes(b"not a png at all")
    save(folders / "generated" / "tiny.png", photo(0)[:20, :20])
    save(folders / "generated" / "lonely.png", photo(5))
    save(folders / "clean" / "img1.png", photo(1)[:48])
    (folders / "generated" / "notes.txt").write_text("hello")

    measured = report_module.measure_folder(folders / "generated", "generated", folders / "clean")

    skipped = {item.path.name: item.reason for item in measured.skipped}
    unpaired = {item.path.name: item.reason for item in measured.unpaired}
    assert set(skipped) == {"broken.png", "tiny.png"}
    assert "too small" in skipped["tiny.png"]
    assert set(unpaired) == {"lonely.png", "img1.png"}
    assert "no clean counterpart" in unpaired["lonely.png"]
    assert "64x48" in unpaired["img1.png"]
    assert [item.path.name for item in measured.ignored] == ["notes.txt"]
    assert measured.estimated.n_images == 4  # img0, img1, img2, lonely
    assert measured.paired.n_images == 2


def test_a_folder_without_usable_images_is_an_error(tmp_path):
    save(tmp_path / "small" / "a.png", photo(0)[:10, :10])

    with pytest.raises(DeflowError, match="no image could be measured"):
        report_module.measure_folder(tmp_path / "small", "real")
    with pytest.raises(DeflowError, match="does not exist"):
        report_module.measure_folder(tmp_path / "missing", "real")


def test_report_files_are_written(folders, tmp_path):
    generated = report_module.measure_folder(folders / "generated", "generated")
    real = report_module.measure_folder(folders / "real", "real")
    report = report_module.build_report(generated, real)

    json_path, figure_path = report_module.write_report(report, tmp_path / "out")

    assert json.loads(json_path.read_text()) == report
    with Image.open(figure_path) as figure:
        assert figure.mode == "RGB" and figure.size == report_figure(report).size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["inspect.json", "inspect.png"]


def test_figure_draws_every_series(folders):
    generated = report_module.measure_folder(folders / "generated", "generated", folders / "clean")
    real = report_module.measure_folder(folders / "real", "real")
    report = report_module.build_report(generated, real)

    with_clean = np.asarray(report_figure(report))
    report["generated"]["paired"] = None
    without_clean = np.asarray(report_figure(report))

    grey = np.array([110, 110, 110])  # the colour of the generated-minus-clean series
    assert (with_clean == grey).all(axis=2).sum() > 50
    assert (without_clean == grey).all(axis=2).sum() < (with_clean == grey).all(axis=2).sum()


def test_inspect_command(folders, tmp_path):
    out_dir = tmp_path / "report"
    arguments = ["inspect", str(folders / "generated"), str(folders / "real")]

    result = CliRunner().invoke(
        app, [*arguments, "--clean", str(folders / "clean"), "--out", str(out_dir)]
    )

    assert result.exit_code == 0, result.output
    assert "noise std R/G/B" in result.stdout
    assert "gen. - clean (3)" in result.stdout
    assert "distance generated-real" in result.stdout
    assert (out_dir / "inspect.json").exists() and (out_dir / "inspect.png").exists()


def test_inspect_command_exit_code_tells_about_skipped_images(folders, tmp_path):
    (folders / "real" / "broken.png").write_bytes(b"\x89PNG broken")
    out_dir = tmp_path / "report"

    arguments = ["inspect", str(folders / "generated"), str(folders / "real")]
    result = CliRunner().invoke(app, [*arguments, "--out", str(out_dir)])

    assert result.exit_code == 1
    assert "broken.png" in result.stderr
    assert "1 image(s) could not be measured" in result.stderr
    report = json.loads((out_dir / "inspect.json").read_text())
    assert [item["path"].endswith("broken.png") for item in report["real"]["skipped"]] == [True]
