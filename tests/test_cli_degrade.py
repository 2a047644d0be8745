"""Tests of the ``deflow-synth degrade`` command."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from deflow_synth import cli
from deflow_synth import convert as convert_module
from deflow_synth.checkpoint import save_model
from deflow_synth.convert import Summary

from .test_convert import TINY, photo
from .test_tiling import realistic_model

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(realistic_model(TINY), path, {"id": "tiny-test"})
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "day one").mkdir(parents=True)
    Image.fromarray(photo(48, 64, 0)).save(folder / "a.png")
    Image.fromarray(photo(41, 37, 1)).save(folder / "day one" / "b.jpg")
    return folder


def table_value(text: str, label: str) -> str:
    """The value in the summary table's row ``label``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0] == label:
            return cells[1]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """Run the real entry point; return its exit code and stderr with lines unwrapped."""
    monkeypatch.setattr(sys, "argv", ["deflow-synth", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, " ".join(capsys.readouterr().err.split())


def test_help_documents_every_option():
    result = runner.invoke(cli.app, ["degrade", "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    for option in (
        "--model", "--yaml", "--samples", "--seed", "--temperature", "--scale", "--device",
        "--tile", "--overlap", "--workers", "--shard", "--overwrite", "--flat", "--format",
    ):  # fmt: skip
        assert option in result.output
    assert "--shard $i/4" in result.output


def test_degrade_writes_pairs_and_a_summary(tmp_path, photos, checkpoint):
    out = tmp_path / "pairs"
    arguments = ["degrade", str(photos), str(out), "--model", str(checkpoint), "--workers", "0"]

    result = runner.invoke(
        cli.app, [*arguments, "--device", "cpu", "--tile", "32", "--overlap", "16"]
    )

    assert result.exit_code == 0, result.output
    assert (out / "lr" / "a.png").is_file() and (out / "hr" / "day one" / "b.png").is_file()
    assert np.asarray(Image.open(out / "hr" / "day one" / "b.png")).shape == (40, 36, 3)
    assert np.asarray(Image.open(out / "lr" / "day one" / "b.png")).shape == (10, 9, 3)
    assert table_value(result.stdout, "done") == "2"
    assert table_value(result.stdout, "failed") == "0"
    err = " ".join(result.stderr.split())
    assert "use --flat for BasicSR" in err
    assert "some file names contain spaces" in err

    again = runner.invoke(cli.app, arguments)
    assert again.exit_code == 0
    assert (table_value(again.stdout, "done"), table_value(again.stdout, "already done")) == (
        "0",
        "2",
    )


def test_failed_files_give_exit_code_1_and_name_the_file(tmp_path, photos, checkpoint):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (photos / "readme.txt").write_text("hello")

    result = runner.invoke(
        cli.app,
        [
            "degrade",
            str(photos),
            str(tmp_path / "o"),
            "--model",
            str(checkpoint),
            "--workers",
            "0",
        ],
    )

    assert result.exit_code == 1
    err = " ".join(result.stderr.split())
    assert "broken.png: corrupt or unsupported image file" in err
    assert "readme.txt: not an image file" in err
    assert (tmp_path / "o" / "lr" / "a.png").is_file()


def test_options_reach_the_pipeline(tmp_path, photos, checkpoint, monkeypatch):
    seen = {}

    def fake(input_dir, output_dir, model, model_info, options, on_start, on_result):
        seen.update(options=options, model_info=model_info, input_dir=input_dir)
        on_start(0)
        return Summary()

    monkeypatch.setattr(convert_module, "degrade_folder", fake)
    result = runner.invoke(
        cli.app,
        [
            "degrade", str(photos), str(tmp_path / "o"), "--model", str(checkpoint),
            "--samples", "3", "--seed", "9", "--temperature", "0.8", "--scale", "2",
            "--device", "cpu", "--tile", "128", "--overlap", "32", "--workers", "2",
            "--shard", "1/3", "--overwrite", "--flat", "--format", "tiff",
        ],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert (options.samples, options.seed, options.temperature, options.scale) == (3, 9, 0.8, 2)
    assert (options.tile, options.overlap, options.workers, options.shard) == (128, 32, 2, (1, 3))
    assert options.overwrite and options.flat and options.image_format == "tiff"
    assert options.device == "cpu"
    assert seen["model_info"].id == "tiny-test"


def test_errors_are_one_line(tmp_path, photos, checkpoint, monkeypatch, capsys):
    out = str(tmp_path / "o")

    code, err = run_main(monkeypatch, capsys, ["degrade", str(photos), out, "--shard", "3/2"])
    assert code == 1 and "--shard: expected 0 <= I < N, got '3/2'" in err

    monkeypatch.setenv("DEFLOW_SYNTH_MODEL", str(tmp_path / "missing.pt"))
    code, err = run_main(monkeypatch, capsys, ["degrade", str(photos), out, "--device", "cpu"])
    assert code == 1 and "default model is missing" in err and "--model" in err

    model = ["--model", str(checkpoint), "--device", "cpu"]
    code, err = run_main(
        monkeypatch,
        capsys,
        ["degrade", str(photos), out, *model, "--tile", "64", "--overlap", "64"],
    )
    assert code == 1 and "--overlap 64 must be smaller than the tile side 64" in err

    code, err = run_main(monkeypatch, capsys, ["degrade", str(tmp_path / "nope"), out, *model])
    assert code == 1 and "input folder not found" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path, photos, checkpoint):
    result = runner.invoke(
        cli.app,
        [
            "degrade",
            str(photos),
            str(tmp_path / "o"),
            "--model",
            str(checkpoint),
            "--device",
            "cuda",
        ],
    )

    assert result.exit_code == 1
    assert "no CUDA device is available" in " ".join(result.stderr.split())


def test_interrupt_exits_130_with_a_resume_hint(tmp_path, photos, checkpoint, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "degrade_folder", interrupted)
    result = runner.invoke(
        cli.app, ["degrade", str(photos), str(tmp_path / "o"), "--model", str(checkpoint)]
    )

    assert result.exit_code == 130
    assert "run the same command to resume" in " ".join(result.stderr.split())
