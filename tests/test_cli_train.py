"""Tests of the ``deflow-synth train`` command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deflow_synth import cli
from deflow_synth import train as train_module
from deflow_synth.checkpoint import load_model, read_card
from deflow_synth.data import SkippedFile
from deflow_synth.errors import DeflowError
from deflow_synth.train import TrainResult

from .test_train import write_folders

runner = CliRunner()


def arguments(root: Path, *extra: str) -> list[str]:
    return [
        "train", "--clean", str(root / "data" / "clean"), "--degraded",
        str(root / "data" / "degraded"), "--out", str(root / "run"), *extra,
    ]


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """Run the real entry point; return its exit code and stderr with lines unwrapped."""
    monkeypatch.setattr(sys, "argv", ["deflow-synth", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, " ".join(capsys.readouterr().err.split())


def test_help_documents_every_option_and_torchrun():
    result = runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    for option in ("--clean", "--degraded", "--out", "--scale", "--preset", "--steps",
                   "--batch-size", "--patch-size", "--lr", "--shift-lr", "--device", "--seed",
                   "--resume", "--normalize-colors", "--paired", "--jobs"):
        assert option in result.output
    assert "small" in result.output and "aim-x8" in result.output
    assert "torchrun --nproc_per_node" in result.output


def test_train_exports_a_model_that_loads_and_degrades(tmp_path):
    folders = write_folders(tmp_path / "data", count=3, clean_size=64, degraded_size=16)
    (folders.clean / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    result = runner.invoke(cli.app, arguments(
        tmp_path, "--steps", "2", "--batch-size", "2", "--patch-size", "16", "--jobs", "1",
        "--device", "cpu", "--seed", "7",
    ))

    assert result.exit_code == 0, result.output
    assert "broken.png" in result.stderr
    assert "NLL clean" in result.stdout and "2 / 2" in result.stdout
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.config.scale == 4
    card = read_card(tmp_path / "run" / "model.pt")
    assert card["preset"] == "small" and card["skipped_files"] == 1
    assert card["train_config"]["seed"] == 7 and card["counts"]["clean"] == 3

    (folders.clean / "broken.png").unlink()
    converted = runner.invoke(cli.app, [
        "degrade", str(folders.clean), str(tmp_path / "pairs"), "--model",
        str(tmp_path / "run" / "model.pt"), "--device", "cpu", "--workers", "0", "--tile", "0",
    ])
    assert converted.exit_code == 0, converted.output
    assert len(list((tmp_path / "pairs" / "lr").glob("*.png"))) == 3


def test_options_reach_the_training_settings(tmp_path, monkeypatch):
    calls = []

    def fake_train(folders, run_dir, config, **kwargs):
        calls.append((folders, run_dir, config, kwargs))
        return TrainResult(run_dir, 0, config.steps, False, 0.0, {}, {}, [], run_dir / "c.pt")

    monkeypatch.setattr(train_module, "train", fake_train)
    result = runner.invoke(cli.app, arguments(
        tmp_path, "--preset", "aim-x8", "--lr", "1e-4", "--steps", "50", "--resume",
        "--paired", str(tmp_path / "pairs"), "--device", "cpu", "--jobs", "3",
    ))

    assert result.exit_code == 0, result.output
    ((folders, run_dir, config, kwargs),) = calls
    assert folders.paired == tmp_path / "pairs" and run_dir == tmp_path / "run"
    assert (config.preset, config.lr, config.steps) == ("aim-x8", 1e-4, 50)
    assert config.normalize_colors and config.patch_size == 160
    assert kwargs["resume"] and kwargs["device"] == "cpu" and kwargs["jobs"] == 3


def test_an_interrupted_run_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    def interrupted(folders, run_dir, config, **kwargs):
        skipped = [SkippedFile(tmp_path / "x.png", "empty file (0 bytes)")]
        return TrainResult(run_dir, 3, 10, True, 1.0, {"clean": 5.0, "degraded": 6.0},
                           {"clean": 1, "degraded": 1}, skipped, run_dir / "checkpoint.pt")

    monkeypatch.setattr(train_module, "train", interrupted)
    result = runner.invoke(cli.app, arguments(tmp_path))

    assert result.exit_code == 130
    assert "Stopped at step 3 of 10" in result.stderr and "--resume" in result.stderr
    assert "not exported yet" in result.stdout


def test_a_folder_without_images_is_one_error_line(tmp_path, monkeypatch, capsys):
    write_folders(tmp_path / "data", count=1)
    for path in (tmp_path / "data" / "clean").iterdir():
        path.unlink()

    code, err = run_main(monkeypatch, capsys, arguments(tmp_path, "--device", "cpu"))

    assert code == 1
    assert f"Error: clean folder {tmp_path / 'data' / 'clean'} holds no images" in err
    assert "Traceback" not in err


def test_no_usable_images_in_a_domain_names_the_files(tmp_path, monkeypatch, capsys):
    write_folders(tmp_path / "data", count=2, clean_size=64, degraded_size=8)

    code, err = run_main(monkeypatch, capsys, arguments(
        tmp_path, "--patch-size", "16", "--device", "cpu", "--jobs", "1",
    ))

    assert code == 1
    assert "d0.png" in err and "d1.png" in err and "smaller than the 16-px patch" in err
    assert "no usable degraded images" in err


def test_bad_settings_and_an_existing_run_are_refused(tmp_path, monkeypatch, capsys):
    write_folders(tmp_path / "data", count=1)

    code, err = run_main(monkeypatch, capsys, arguments(tmp_path, "--patch-size", "20"))
    assert code == 1 and "--patch-size: expected a multiple of 8" in err

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    code, err = run_main(monkeypatch, capsys, arguments(tmp_path))
    assert code == 1 and "already holds a training run" in err and "--resume" in err


def test_resume_of_a_foreign_file_is_refused(tmp_path):
    write_folders(tmp_path / "data", count=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")

    result = runner.invoke(cli.app, arguments(tmp_path, "--resume", "--device", "cpu"))

    assert isinstance(result.exception, DeflowError)
    assert "checkpoint.pt" in str(result.exception)


def test_resume_keeps_the_runs_settings_and_may_extend_it(tmp_path):
    write_folders(tmp_path / "data", count=3, clean_size=64, degraded_size=16)
    common = ("--device", "cpu", "--jobs", "1")
    first = runner.invoke(cli.app, arguments(
        tmp_path, "--steps", "1", "--batch-size", "2", "--patch-size", "16", "--lr", "1e-3",
        *common,
    ))
    assert first.exit_code == 0, first.output

    second = runner.invoke(cli.app, arguments(
        tmp_path, "--resume", "--steps", "2", "--lr", "5e-3", *common
    ))

    assert second.exit_code == 0, second.output
    assert "ignored: lr=0.005 (the run has 0.001)" in " ".join(second.stderr.split())
    card = read_card(tmp_path / "run" / "model.pt")
    assert card["steps"] == 2
    assert card["train_config"]["lr"] == 1e-3 and card["train_config"]["patch_size"] == 16


@pytest.mark.slow
def test_torchrun_trains_with_two_processes(tmp_path):
    write_folders(tmp_path / "data", count=4, clean_size=64, degraded_size=16)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--no-python", str(Path(sys.executable).parent / "deflow-synth"),
        *arguments(tmp_path, "--steps", "2", "--batch-size", "2", "--patch-size", "16",
                   "--device", "cpu", "--jobs", "1"),
    ]

    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 device(s)" in (tmp_path / "run" / "train.log").read_text()
    assert read_card(tmp_path / "run" / "model.pt")["steps"] == 2
    assert run.stdout.count("deflow-synth train") == 1
