"""Tests of deflow_synth.train: the DeFlow objective, resume, export and the bad-step guard."""

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deflow_synth import config as config_module
from deflow_synth import train as train_module
from deflow_synth.checkpoint import load_model, read_card, safe_load
from deflow_synth.errors import DeflowError
from deflow_synth.model import DeFlow
from deflow_synth.shift import CLEAN, DEGRADED, DomainShift
from deflow_synth.train import (
    DataFolders,
    TrainConfig,
    TrainingDiverged,
    check_run_dir,
    load_training_state,
    make_optimizer,
    set_learning_rates,
    train,
    train_config,
)

TINY_ARCHITECTURE = config_module.DeFlowConfig(
    scale=4,
    n_levels=2,
    n_coupling_steps=1,
    n_plain_steps=1,
    coupling_hidden=8,
    encoder_features=8,
    encoder_blocks=1,
    encoder_growth=8,
    stacked_blocks=(0,),
)
TINY_TRAINING = TrainConfig(
    preset="tiny",
    steps=6,
    batch_size=4,
    patch_size=16,
    lr=2e-3,
    shift_lr=2e-2,
    checkpoint_every=2,
    validate_every=3,
    log_every=1,
    val_patches=4,
)


@pytest.fixture
def tiny_preset(monkeypatch):
    """A preset "tiny" of about 12 k parameters, registered for the duration of a test."""
    monkeypatch.setitem(config_module.PRESETS, "tiny", TINY_ARCHITECTURE)
    monkeypatch.setitem(train_module.TRAIN_PRESETS, "tiny", TINY_TRAINING)
    return TINY_TRAINING


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A [0, 1] RGB image made of a few low-frequency waves."""
    rows, columns = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    for channel in range(3):
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 6.3)
            image[:, :, channel] += np.sin(2 * np.pi * (fy * rows + fx * columns) + phase)
    return (image - image.min()) / (image.max() - image.min()) * 0.8 + 0.1


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def write_folders(root: Path, count: int = 6, clean_size: int = 96, degraded_size: int = 32):
    """Clean smooth photos at 4x the size of degraded noisy ones; returns DataFolders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        write_png(root / "clean" / f"c{i}.png", smooth_image(rng, clean_size))
        noisy = smooth_image(rng, degraded_size) + rng.normal(0, 0.08, (degraded_size,) * 2 + (3,))
        write_png(root / "degraded" / f"d{i}.png", noisy)

    return DataFolders(root / "clean", root / "degraded")


# The paper's toy case (section 3.1)


class AffineFlow(nn.Module):
    """z = (x - offset) / exp(log_scale), the simplest flow, with one 1-channel domain shift."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(1))
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.shifts = nn.ModuleList([DomainShift(1, init_std=1e-2)])

    def flow_parameters(self):
        return iter([self.offset, self.log_scale])

    def shift_parameters(self):
        return self.shifts.parameters()

    def nll(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        z = (x - self.offset) * torch.exp(-self.log_scale)
        return -(self.shifts[0].log_prob(z, domain) - self.log_scale * x[0].numel())


def test_toy_case_recovers_the_degradation_distribution():
    # x ~ N(mu_x, sigma_x^2) and y = x + u, u ~ N(mu_u, sigma_u^2), seen unpaired.
    mu_x, sigma_x, mu_u, sigma_u = 0.4, 0.1, 0.15, 0.1
    generator = torch.Generator().manual_seed(1)
    n = 20_000
    x = mu_x + sigma_x * torch.randn(n, 1, 1, 1, generator=generator)
    other_x = mu_x + sigma_x * torch.randn(n, 1, 1, 1, generator=generator)
    y = other_x + mu_u + sigma_u * torch.randn(n, 1, 1, 1, generator=generator)

    torch.manual_seed(0)
    flow = AffineFlow()
    config = TrainConfig(steps=1500, lr=2e-2, shift_lr=5e-2)
    optimizer = make_optimizer(flow, config)
    for step in range(config.steps):
        set_learning_rates(optimizer, config.lr_factor(step))
        loss = flow.nll(x, CLEAN).mean() + flow.nll(y, DEGRADED).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # u = exp(log_scale) * (mean + M n) in image space.
    scale = flow.log_scale.exp().item()
    shift = flow.shifts[0]
    assert scale * shift.mean.item() == pytest.approx(mu_u, rel=0.05)
    assert scale * abs(shift.matrix.item()) == pytest.approx(sigma_u, rel=0.05)
    assert flow.offset.item() == pytest.approx(mu_x, rel=0.05)
    assert scale == pytest.approx(sigma_x, rel=0.05)


# Settings


def test_schedule_halves_the_rate_at_the_milestones():
    config = TrainConfig(steps=100)
    factors = [config.lr_factor(step) for step in (0, 49, 50, 74, 75, 90, 95, 99)]
    assert factors == [1, 1, 0.5, 0.5, 0.25, 0.125, 0.0625, 0.0625]


def test_presets_share_one_table_and_check_their_settings():
    assert set(train_module.TRAIN_PRESETS) == set(config_module.PRESETS)
    assert train_config("small", steps=None, lr=1e-3).lr == 1e-3
    assert train_config("aim-x8").normalize_colors
    with pytest.raises(DeflowError, match="multiple of 8"):
        train_config("small", patch_size=60).check()
    with pytest.raises(DeflowError, match="even"):
        train_config("small", batch_size=3).check()
    with pytest.raises(DeflowError, match="unknown preset"):
        train_config("huge")


def test_optimizer_gives_the_shift_its_own_rate():
    model = DeFlow(TINY_ARCHITECTURE)
    optimizer = make_optimizer(model, replace(TINY_TRAINING, lr=1e-3, shift_lr=1e-2))
    shift_ids = {id(p) for p in model.shift_parameters()}

    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == shift_ids
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# Training


def test_training_lowers_both_nlls_and_moves_the_shift(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data")
    config = replace(tiny_preset, steps=40, batch_size=8, validate_every=1, checkpoint_every=40)
    validations = []

    def record(report):
        if report.validation:
            validations.append(report.validation)

    result = train(folders, tmp_path / "run", config, device="cpu", on_progress=record)

    first, last = validations[0], result.validation
    assert last["clean"] < first["clean"] - 0.05
    assert last["degraded"] < first["degraded"] - 0.05

    torch.manual_seed(config.seed)
    initial = DeFlow(config.model_config())
    trained = load_model(result.model)
    for before, after in zip(initial.shifts, trained.shifts, strict=True):
        assert not torch.allclose(before.mean, after.mean, atol=1e-3)
        assert not torch.allclose(before.matrix, after.matrix, atol=1e-3)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data")
    whole = train(folders, tmp_path / "whole", tiny_preset, device="cpu")

    def interrupt_at_step_3(report):
        if report.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = train(folders, tmp_path / "part", tiny_preset, device="cpu",
                 on_progress=interrupt_at_step_3)
    assert part.interrupted and part.step == 3 and part.model is None
    assert load_training_state(part.checkpoint)["step"] == 3

    resumed = train(folders, tmp_path / "part", tiny_preset, device="cpu", resume=True)
    assert not resumed.interrupted and resumed.step == tiny_preset.steps

    expected, actual = safe_load(whole.checkpoint), safe_load(resumed.checkpoint)
    for name, value in expected["model"].items():
        torch.testing.assert_close(actual["model"][name], value, rtol=1e-5, atol=1e-6)
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(actual["optimizer"]["state"][index][key], value,
                                       rtol=1e-5, atol=1e-7)
    assert resumed.validation == pytest.approx(whole.validation, rel=1e-5)


def test_existing_run_needs_resume(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data", count=3)
    config = replace(tiny_preset, steps=1)
    train(folders, tmp_path / "run", config, device="cpu")

    with pytest.raises(DeflowError, match="--resume"):
        train(folders, tmp_path / "run", config, device="cpu")


def test_export_loads_with_its_card(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data", count=3)
    config = replace(tiny_preset, steps=2)
    result = train(folders, tmp_path / "run", config, device="cpu")

    model = load_model(result.model)
    card = read_card(result.model)
    assert model.config == config.model_config()
    assert card == json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["counts"]["clean"] == 3 and card["counts"]["degraded"] == 3
    assert card["steps"] == 2 and card["scale"] == 4 and card["preset"] == "tiny"
    assert set(card["final_nll_bits_per_dim"]) == {"clean", "degraded"}
    assert card["data"]["clean"] == str(folders.clean.resolve())
    assert result.sheet.is_file() and Image.open(result.sheet).size[0] > 0
    assert "validation at step 2" in (tmp_path / "run" / "train.log").read_text()


def test_colour_normalisation_stores_each_domains_statistics(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data", count=3)
    config = replace(tiny_preset, steps=1, normalize_colors=True)
    result = train(folders, tmp_path / "run", config, device="cpu")

    model = load_model(result.model)
    assert model.config.color_normalization
    degraded = np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255
                         for p in sorted(folders.degraded.iterdir())])
    torch.testing.assert_close(
        model.color_mean[DEGRADED].double(), torch.from_numpy(degraded.mean((0, 1, 2))),
        atol=1e-4, rtol=0,
    )
    assert not torch.allclose(model.color_mean[CLEAN], model.color_mean[DEGRADED])


def test_paired_data_adds_the_paired_term(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data", count=3)
    rng = np.random.default_rng(5)
    for i in range(2):
        write_png(tmp_path / "pairs" / "hr" / f"p{i}.png", smooth_image(rng, 64))
        write_png(tmp_path / "pairs" / "lr" / f"p{i}.png", smooth_image(rng, 16))
    write_png(tmp_path / "pairs" / "lr" / "lonely.png", smooth_image(rng, 16))
    folders = replace(folders, paired=tmp_path / "pairs")
    reports = []

    result = train(folders, tmp_path / "run", replace(tiny_preset, steps=2), device="cpu",
                   on_progress=reports.append)

    assert set(reports[-1].nll) == {"clean", "degraded", "paired"}
    assert math.isfinite(reports[-1].nll["paired"])
    assert result.counts["pairs"] == 2
    assert [s.path.name for s in result.skipped] == ["lonely.png"]


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_preset, monkeypatch):
    folders = write_folders(tmp_path / "data", count=3)
    config = replace(tiny_preset, steps=8, checkpoint_every=2, max_bad_steps=3)
    forward = train_module.Objective.forward

    def poisoned(self, x, *args):
        nll, paired = forward(self, x, *args)
        return (nll * float("nan"), paired) if poisoned.calls >= 2 else (nll, paired)

    def count(report):
        poisoned.calls = report.step

    poisoned.calls = 0
    monkeypatch.setattr(train_module.Objective, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="3 steps in a row.*checkpoint"):
        train(folders, tmp_path / "run", config, device="cpu", on_progress=count)

    state = load_training_state(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "step 2 skipped" in (tmp_path / "run" / "train.log").read_text()


def test_a_domain_without_usable_images_refuses_to_start(tmp_path, tiny_preset):
    folders = write_folders(tmp_path / "data", count=2, degraded_size=8)

    with pytest.raises(DeflowError, match=r"no usable degraded images .* all 2 files"):
        train(folders, tmp_path / "run", tiny_preset, device="cpu")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr": float("inf")}, "finite"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"validate_every": 0}, "--validate-every"),
        ({"seed": -5}, "--seed"),
    ],
)
def test_invalid_settings_are_refused_before_training(overrides, message):
    with pytest.raises(DeflowError, match=message):
        train_config("small", **overrides).check()


def test_run_folder_inside_a_data_folder_is_refused(tmp_path):
    folders = DataFolders(tmp_path / "clean", tmp_path / "degraded")
    with pytest.raises(DeflowError, match="inside the data folder"):
        check_run_dir(tmp_path / "clean" / "run", folders)
    check_run_dir(tmp_path / "runs" / "one", folders)
