"""Training a DeFlow model on unpaired clean and degraded images (Eq. 7, optionally Eq. 5).

The loss is the negative log-likelihood, in bits per dimension, of clean patches under the
clean latent distribution plus that of degraded patches under the shifted one, each flow
conditioned on its own domain-invariant view h (the patch downsampled by ``config.scale``).

Every batch and every noise draw is a pure function of (seed, step, rank), and a training
checkpoint holds the model, the optimiser and the step, so an interrupted run that resumes
produces the same parameters as one that never stopped.

Example:
    deflow-synth train --clean photos/ --degraded camera/ --out runs/cam --preset small
    torchrun --nproc_per_node 4 --no-python deflow-synth train --clean ... --out ...
"""

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .atomic import atomic_write, write_json_atomic
from .config import PRESETS, DeFlowConfig, preset
from .data import VALIDATION_STREAM, SkippedFile, TrainingData
from .errors import DeflowError
from .log import logger
from .model import CLEAN, DEGRADED, DeFlow

__all__ = [
    "TRAIN_PRESETS",
    "DataFolders",
    "Progress",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "resolve_config",
    "train",
    "train_config",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "deflow-synth-train"
CHECKPOINT_VERSION = 1

class TrainingDiverged(DeflowError):
    """The loss or the gradient stayed non-finite for too many steps in a row."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; saved in every training checkpoint.

    Arguments:
        preset: the architecture preset (see ``deflow_synth.config.PRESETS``).
        scale: clean HR photos are downsampled by this factor into the clean domain.
        steps: optimiser steps of the run.
        batch_size: patches per step and device, half from each domain (and as many pairs).
        patch_size: side of the patches at model resolution; a multiple of the preset's
            ``size_multiple``.
        crop_alignment: patch offsets are multiples of this (8 keeps 8x8 codec blocks on the
            grid of the flow's squeezes, as the official AIM configuration does).
        lr: Adam learning rate of the flow and the condition encoder.
        shift_lr: Adam learning rate of the domain shifts (mean and matrix).
        betas: Adam's moment decays.
        grad_clip: the gradient's global norm is clipped to this.
        lr_milestones: fractions of the steps at which both rates are multiplied by lr_decay.
        lr_decay: the factor applied at each milestone.
        normalize_colors: map degraded images to the clean domain's colour statistics.
        seed: seed of every random draw.
        checkpoint_every: steps between training checkpoints.
        validate_every: steps between validations (NLL per domain and a sample sheet).
        log_every: steps between lines in the log file.
        val_patches: held-out patches per domain for validation.
        max_bad_steps: stop after this many non-finite steps in a row.
    """

    preset: str = "small"
    scale: int = 4
    steps: int = 4500
    batch_size: int = 16
    patch_size: int = 64
    crop_alignment: int = 8
    lr: float = 5e-4
    shift_lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 10.0
    lr_milestones: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
    lr_decay: float = 0.5
    normalize_colors: bool = False
    seed: int = 0
    checkpoint_every: int = 250
    validate_every: int = 500
    log_every: int = 25
    val_patches: int = 8
    max_bad_steps: int = 10

    def check(self) -> None:
        """Raise DeflowError naming the first invalid setting."""
        multiple = self.model_config().size_multiple
        if self.patch_size < multiple or self.patch_size % multiple:
            raise DeflowError(
                f"--patch-size: expected a multiple of {multiple} for preset {self.preset!r}, "
                f"got {self.patch_size}"
            )
        if self.batch_size < 2 or self.batch_size % 2:
            raise DeflowError(f"--batch-size: expected an even number >= 2, got {self.batch_size}")
        if self.scale < 1:
            raise DeflowError(f"--scale: expected a positive integer, got {self.scale}")
        if self.steps < 1:
            raise DeflowError(f"--steps: expected at least 1, got {self.steps}")
        if not all(math.isfinite(r) and r > 0 for r in (self.lr, self.shift_lr)):
            raise DeflowError(
                f"learning rates must be positive and finite, got {self.lr}, {self.shift_lr}"
            )
        for name in ("checkpoint_every", "validate_every", "log_every"):
            if getattr(self, name) < 1:
                option = "--" + name.replace("_", "-")
                raise DeflowError(f"{option}: expected at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise DeflowError(f"--seed: expected a non-negative integer, got {self.seed}")

    def model_config(self) -> DeFlowConfig:
        return preset(self.preset, color_normalization=self.normalize_colors)

    def lr_factor(self, step: int) -> float:
        """The step schedule: lr_decay to the power of the milestones already passed."""
        passed = sum(step >= round(m * self.steps) for m in self.lr_milestones)
        return self.lr_decay**passed

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})


# Per-preset defaults: the one place to tune them. The official DeFlow settings (lr 5e-5 for
# everything, shift matrix started at zero) learned nothing in 35 minutes on 2 CPU cores, so
# the small preset trains ten times faster and its shift ten times faster again; its 4500 steps
# take about 40 minutes on 2 idle CPU cores, 65 on one.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "small": TrainConfig(preset="small"),
    "ntire-x4": TrainConfig(
        preset="ntire-x4",
        steps=100_000,
        patch_size=160,
        lr=5e-5,
        shift_lr=5e-4,
        checkpoint_every=2500,
        validate_every=5000,
        log_every=100,
    ),
    "aim-x8": TrainConfig(
        preset="aim-x8",
        steps=100_000,
        patch_size=160,
        lr=5e-5,
        shift_lr=5e-4,
        normalize_colors=True,
        checkpoint_every=2500,
        validate_every=5000,
        log_every=100,
    ),
}
assert set(TRAIN_PRESETS) == set(PRESETS), "every architecture preset needs training defaults"

# Settings a resumed run may change without breaking its reproducibility.
RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "validate_every", "log_every", "max_bad_steps"}
)


def train_config(preset_name: str = "small", **overrides: Any) -> TrainConfig:
    """The training defaults of a preset, with field overrides (None values are ignored)."""
    if preset_name not in TRAIN_PRESETS:
        raise DeflowError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}

    return replace(TRAIN_PRESETS[preset_name], **given)


@dataclass(frozen=True)
class DataFolders:
    """Where the training images are.

    Arguments:
        clean: clean HR photos.
        degraded: real degraded images at the resolution the SR model will be fed.
        paired: optional folder with aligned hr/ and lr/ subfolders (same relative names).
    """

    clean: Path
    degraded: Path
    paired: Path | None = None


@dataclass(frozen=True)
class Progress:
    """What the loop reports to its caller after every step.

    Arguments:
        step: steps done.
        total: steps of the run.
        nll: running mean NLL in bits/dim per term ("clean", "degraded", maybe "paired").
        steps_per_second: speed since the run (or the resume) started.
        lr: current flow learning rate.
        validation: NLL per domain when this step ran a validation, else None.
        skipped: True when this step was skipped because of a non-finite loss or gradient.
    """

    step: int
    total: int
    nll: dict[str, float]
    steps_per_second: float
    lr: float
    validation: dict[str, float] | None = None
    skipped: bool = False


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    Arguments:
        run_dir: the run folder.
        step: steps done.
        total: steps asked for.
        interrupted: the run stopped early on a signal; resume it with ``resume=True``.
        seconds: training time, over all sessions of the run.
        validation: the last NLL per domain on the held-out patches.
        counts: usable images per domain (and pairs).
        skipped: files that could not be used.
        checkpoint: the training checkpoint.
        model: the exported model (None until the run is complete).
        sheet: the last sample sheet.
    """

    run_dir: Path
    step: int
    total: int
    interrupted: bool
    seconds: float
    validation: dict[str, float]
    counts: dict[str, int]
    skipped: list[SkippedFile]
    checkpoint: Path
    model: Path | None = None
    sheet: Path | None = None


# Distributed context


@dataclass(frozen=True)
class Distributed:
    """This process's place under torchrun: rank, number of ranks and device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without CUDA is a DeflowError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DeflowError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")

    return torch.device("cuda", local_rank)


def start_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if world_size <= 1:
        return Distributed(0, 1, device)

    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    return Distributed(dist.get_rank(), world_size, device)


def all_max(values: list[float], context: Distributed) -> list[float]:
    """Element-wise maximum over ranks (the values themselves on one device)."""
    if not context.active:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)

    return tensor.tolist()


def barrier(context: Distributed) -> None:
    """Wait for every rank (nothing on one device)."""
    if context.active:
        import torch.distributed as dist

        dist.barrier()


def load_data(
    folders: DataFolders, cache_dir: Path, config: TrainConfig, context: Distributed, jobs: int
) -> TrainingData:
    """The training data of this rank; rank 0 fills the cache while the others wait."""
    if not context.is_main:
        barrier(context)
    data = TrainingData(
        folders, cache_dir, config, context.device, context.rank, context.world_size,
        jobs if context.is_main else 1,
    )
    if context.is_main:
        barrier(context)

    return data


# Objective


class Objective(nn.Module):
    """Per-sample NLL in bits/dim of a batch (Eq. 7), and of aligned pairs (Eq. 5).

    Wrapping the objective rather than the model lets DistributedDataParallel see every
    parameter use inside one forward call.
    """

    def __init__(self, model: DeFlow):
        super().__init__()
        self.model = model

    def forward(
        self, x: Tensor, h: Tensor, domain: Tensor, cond_noise: Tensor, dequant_noise: Tensor,
        *pairs: Tensor,
    ) -> tuple[Tensor, Tensor]:
        cond = self.model.condition(h, cond_noise)
        _, nll = self.model.encode(x, cond, domain, dequant_noise)
        if not pairs:
            return nll, nll.new_zeros(0)

        pair_x, pair_y, pair_h, pair_cond_noise, pair_dequant_noise = pairs
        pair_cond = self.model.condition(pair_h, pair_cond_noise)

        return nll, self.model.paired_nll(pair_x, pair_y, pair_cond, pair_dequant_noise)


def domain_terms(nll: Tensor, paired: Tensor) -> dict[str, Tensor]:
    """Mean NLL per term: the first half of the batch is clean, the second degraded."""
    half = len(nll) // 2
    terms = {"clean": nll[:half].mean(), "degraded": nll[half:].mean()}
    if len(paired):
        terms["paired"] = paired.mean()

    return terms


def make_optimizer(model: DeFlow, config: TrainConfig) -> torch.optim.Adam:
    """Adam with the flow in group 0 and the domain shifts, at their own rate, in group 1."""
    groups = [
        {"params": list(model.flow_parameters()), "lr": config.lr, "base_lr": config.lr},
        {"params": list(model.shift_parameters()), "lr": config.shift_lr,
         "base_lr": config.shift_lr},
    ]
    return torch.optim.Adam(groups, betas=config.betas)


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's base rate times the schedule's factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# Validation


@torch.no_grad()
def validate(model: DeFlow, data: TrainingData) -> tuple[dict[str, float], np.ndarray]:
    """Mean NLL per domain on the fixed validation patches, and a translated copy of the
    clean ones (N, P, P, 3) for the sample sheet."""
    was_training = model.training
    model.eval()
    device, seed = data.device, data.config.seed + VALIDATION_STREAM

    nll = {}
    for role, domain in (("clean", CLEAN), ("degraded", DEGRADED)):
        patches = data.validation[role]
        x, h = data.with_condition(patches, len(patches) if domain == CLEAN else 0, model)
        generator = torch.Generator().manual_seed(seed)
        cond_noise = torch.randn(h.shape, generator=generator).to(device)
        dequant_noise = torch.rand(x.shape, generator=generator).to(device)

        cond = model.condition(h, cond_noise)
        nll[role] = model.encode(x, cond, domain, dequant_noise)[1].mean().item()
        if domain == CLEAN:
            shift_noise = [
                torch.randn(shape, generator=generator).to(device)
                for shape in model.latent_shapes(cond)
            ]
            translated = model.translate(x, cond, CLEAN, 1.0, shift_noise, dequant_noise)

    model.train(was_training)
    return nll, translated.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def sample_sheet(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """A PNG grid with one labelled row per (label, (N, P, P, 3) [0, 1] patches), atomically."""
    from PIL import Image, ImageDraw

    label_width, gap = 90, 4
    patch = rows[0][1].shape[1]
    zoom = max(1, 128 // patch)
    tile = patch * zoom
    columns = max(len(images) for _, images in rows)
    sheet = Image.new(
        "RGB", (label_width + columns * (tile + gap), len(rows) * (tile + gap)), "white"
    )
    draw = ImageDraw.Draw(sheet)

    for row, (label, images) in enumerate(rows):
        top = row * (tile + gap)
        draw.text((4, top + tile // 2 - 6), label, fill="black")
        for column, image in enumerate(images):
            pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
            pixels = pixels.resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(pixels, (label_width + column * (tile + gap), top))

    with atomic_write(path) as file:
        sheet.save(file, format="PNG")


# Checkpoints


def save_training_state(
    path: Path, model: DeFlow, optimizer: torch.optim.Optimizer, config: TrainConfig,
    step: int, seconds: float, folders: DataFolders,
) -> None:
    """Write everything a resumed run needs, as tensors, plain containers and numbers."""
    from .checkpoint import atomic_torch_save

    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "step": step,
        "seconds": seconds,
        "train_config": asdict(config),
        "model_config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "data": {k: str(v) if v else None for k, v in asdict(folders).items()},
        "version": __version__,
    }
    atomic_torch_save(state, path)


def load_training_state(path: Path) -> dict[str, Any]:
    """A training checkpoint, loaded with ``weights_only=True``."""
    from .checkpoint import safe_load

    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DeflowError(f"{path}: not a deflow-synth training checkpoint")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise DeflowError(f"{path}: unsupported training checkpoint version")

    return state


def resumed_config(saved: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """A run's saved settings with the changes a resumed run allows; others are logged."""
    allowed, ignored = {}, []
    for name, value in changes.items():
        if getattr(saved, name) == value:
            continue
        if name in RESUMABLE_CHANGES:
            allowed[name] = value
        else:
            ignored.append(f"{name}={value!r} (the run has {getattr(saved, name)!r})")

    if ignored:
        logger.warning("resume keeps the run's settings; ignored: %s", ", ".join(ignored))
    if "steps" in allowed:
        logger.warning("resume with %d steps instead of %d: the rate schedule is recomputed",
                       allowed["steps"], saved.steps)

    return replace(saved, **allowed)


def resolve_config(
    run_dir: Path, resume: bool, preset_name: str | None = None, **overrides: Any
) -> TrainConfig:
    """The settings of a run from the options given (None: not given).

    A new run takes the preset's defaults with the overrides; a resumed run keeps its saved
    settings, except for the given ones in ``RESUMABLE_CHANGES``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    checkpoint = run_dir / CHECKPOINT_NAME
    if not (resume and checkpoint.exists()):
        return train_config(preset_name or "small", **given)

    saved = TrainConfig.from_dict(load_training_state(checkpoint)["train_config"])
    if preset_name is not None:
        given["preset"] = preset_name

    return resumed_config(saved, given)


def model_card(
    config: TrainConfig, folders: DataFolders, data: TrainingData, step: int, seconds: float,
    validation: dict[str, float],
) -> dict[str, Any]:
    return {
        "tool": "deflow-synth",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {k: str(v.resolve()) if v else None for k, v in asdict(folders).items()},
        "counts": data.counts,
        "skipped_files": len(data.skipped),
        "scale": config.scale,
        "preset": config.preset,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "final_nll_bits_per_dim": {k: round(v, 5) for k, v in validation.items()},
        "train_config": asdict(config),
    }


# Signals


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "StopRequest":
        if not _in_main_thread():
            return self
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self.handle)
        return self

    def handle(self, number, frame) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: saving a checkpoint after this step")

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# The loop


def train(
    folders: DataFolders,
    run_dir: Path,
    config: TrainConfig,
    *,
    device: str = "auto",
    resume: bool = False,
    jobs: int = 1,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Train a DeFlow model on the folders and export it to ``run_dir/model.pt``.

    Arguments:
        folders: the clean, degraded and optional paired image folders.
        run_dir: the run folder: cache, log, checkpoint, sample sheets, model and card.
        config: the settings; on resume, the run's saved settings win except for
            ``RESUMABLE_CHANGES``.
        device: "auto", "cpu" or "cuda".
        resume: continue from ``run_dir/checkpoint.pt``.
        jobs: joblib workers preparing the cached images.
        on_progress: called on rank 0 after every step.
    """
    if not resume:
        config.check()
    check_run_dir(run_dir, folders)
    context = start_distributed(device)
    handler, level = None, logger.level
    try:
        if context.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                handler = _attach_log_file(run_dir / "train.log")
            except OSError as error:
                raise DeflowError(f"{run_dir}: cannot write the run folder ({error})") from error
        return _train(folders, run_dir, config, context, resume, jobs, on_progress)
    except DeflowError as error:
        # Logged below warning level: the caller reports the error itself.
        logger.info("run stopped: %s", error)
        raise
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
            logger.setLevel(level)
        if context.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)

    return handler


def _train(
    folders: DataFolders, run_dir: Path, config: TrainConfig, context: Distributed,
    resume: bool, jobs: int, on_progress: Callable[[Progress], None] | None,
) -> TrainResult:
    checkpoint = run_dir / CHECKPOINT_NAME

    # Settings: a resumed run keeps its own.
    state = None
    if resume and checkpoint.exists():
        state = load_training_state(checkpoint)
        saved = TrainConfig.from_dict(state["train_config"])
        config = resumed_config(saved, {f.name: getattr(config, f.name) for f in fields(config)})
    elif resume:
        logger.warning("no checkpoint in %s to resume from: starting a new run", run_dir)
    elif checkpoint.exists():
        raise DeflowError(
            f"{run_dir} already holds a training run ({checkpoint.name}); "
            "pass --resume to continue it, or choose another --out"
        )
    config.check()
    torch.manual_seed(config.seed)

    data = load_data(folders, run_dir / "cache", config, context, jobs)
    model = DeFlow(config.model_config()).to(context.device)
    model.train()
    optimizer = make_optimizer(model, config)

    step, seconds = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds = state["step"], state["seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        logger.info("resumed %s at step %d", run_dir, step)
    else:
        if config.normalize_colors:
            model.set_color_stats(*data.color_stats())
        # ActNorm initialises from its first batch: do it before DDP copies rank 0's weights.
        with torch.no_grad():
            batch = data.batch(0, model)
            Objective(model)(batch.x, batch.h, batch.domain, batch.cond_noise,
                             batch.dequant_noise, *batch.pairs)

    logger.info(
        "training %s on %d device(s) (%s): %s", run_dir, context.world_size, context.device,
        json.dumps(asdict(config)),
    )
    logger.info("data: %s", json.dumps(data.counts))

    objective: nn.Module = Objective(model)
    if context.active:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)

    return _loop(objective, model, optimizer, data, config, folders, run_dir, context,
                 step, seconds, on_progress)


def _loop(
    objective: nn.Module, model: DeFlow, optimizer: torch.optim.Optimizer, data: TrainingData,
    config: TrainConfig, folders: DataFolders, run_dir: Path, context: Distributed,
    step: int, seconds: float, on_progress: Callable[[Progress], None] | None,
) -> TrainResult:
    checkpoint = run_dir / CHECKPOINT_NAME
    sheet = None
    validation: dict[str, float] = {}
    window: dict[str, list[float]] = {}
    running: dict[str, float] = {}
    bad_in_row, first_step, started = 0, step, time.perf_counter()

    def save() -> None:
        if context.is_main:
            elapsed = seconds + time.perf_counter() - started
            save_training_state(checkpoint, model, optimizer, config, step, elapsed, folders)

    def run_validation() -> None:
        nonlocal validation, sheet
        validation, translated = validate(model, data)
        sheet = run_dir / "samples" / f"step-{step:07d}.png"
        sample_sheet(
            [("clean", data.validation["clean"]), ("translated", translated),
             ("degraded", data.validation["degraded"])],
            sheet,
        )
        logger.info("validation at step %d: NLL %s bits/dim", step,
                    ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))

    with StopRequest() as stop:
        while step < config.steps:
            # Rates follow the step schedule.
            factor = config.lr_factor(step)
            set_learning_rates(optimizer, factor)

            # Forward and backward on this step's batch.
            batch = data.batch(step, model)
            nll, paired = objective(batch.x, batch.h, batch.domain, batch.cond_noise,
                                    batch.dequant_noise, *batch.pairs)
            terms = domain_terms(nll, paired)
            loss = torch.stack(list(terms.values())).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)

            # A non-finite loss or gradient skips the step; too many in a row end the run.
            finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
            bad = all_max([float(not finite)], context)[0]
            if bad:
                bad_in_row += 1
                logger.warning("step %d skipped: loss %s, gradient norm %s",
                               step, loss.item(), norm.item())
                if bad_in_row >= config.max_bad_steps:
                    saved = (
                        f"the last good checkpoint {checkpoint} is intact"
                        if checkpoint.is_file() else "no checkpoint had been written yet"
                    )
                    raise TrainingDiverged(
                        f"training diverged: {bad_in_row} steps in a row before step {step + 1} "
                        f"had a non-finite loss or gradient; {saved}. Start a new run with a "
                        "lower --lr (a resumed run keeps its settings)"
                    )
            else:
                bad_in_row = 0
                optimizer.step()
                step += 1

            # Running NLL per term for the progress bar and the log.
            for name, value in terms.items():
                value = value.item()
                if math.isfinite(value):
                    window.setdefault(name, []).append(value)
                    running[name] = 0.9 * running.get(name, value) + 0.1 * value
            rate = (step - first_step) / max(time.perf_counter() - started, 1e-9)
            if context.is_main and not bad and step % config.log_every == 0:
                logger.info(
                    "step %d/%d  loss %.4f  %s  gradient norm %.3g  lr %.3g  %.2f steps/s",
                    step, config.steps, loss.item(),
                    "  ".join(f"{k} {np.mean(v):.4f}" for k, v in window.items()),
                    norm.item(), config.lr * factor, rate,
                )
                window = {}

            # Validate and checkpoint at their intervals; stop cleanly when asked.
            done = step >= config.steps
            validate_due = not bad and step % config.validate_every == 0 and not done
            if context.is_main and validate_due:
                run_validation()
            if context.is_main and on_progress is not None:
                on_progress(Progress(step, config.steps, dict(running), rate, config.lr * factor,
                                     validation if validate_due else None, bool(bad)))
            stopping = all_max([float(stop.requested)], context)[0]
            if (not bad and (step % config.checkpoint_every == 0 or done)) or stopping:
                save()
            if stopping and not done:
                logger.warning("stopped at step %d; checkpoint saved to %s", step, checkpoint)
                break

    seconds += time.perf_counter() - started
    result = TrainResult(
        run_dir, step, config.steps, step < config.steps, seconds, validation, data.counts,
        data.skipped, checkpoint,
    )
    if result.interrupted or not context.is_main:
        result.sheet = sheet
        return result

    # Final validation and export.
    run_validation()
    result.validation, result.sheet = validation, sheet
    card = model_card(config, folders, data, step, seconds, validation)
    result.model = export(model, run_dir, card)

    return result


def check_run_dir(run_dir: Path, folders: DataFolders) -> None:
    """Refuse a run folder inside a data folder: its sample sheets would become training data."""
    target = run_dir.resolve()
    for folder in (folders.clean, folders.degraded, folders.paired):
        if folder is not None and target.is_relative_to(Path(folder).resolve()):
            raise DeflowError(
                f"{run_dir}: the run folder lies inside the data folder {folder}; its sample "
                "sheets would be read as training images. Choose a run folder elsewhere"
            )


def export(model: DeFlow, run_dir: Path, card: dict[str, Any]) -> Path:
    """The final model as run_dir/model.pt with its card, also as run_dir/model.json."""
    from .checkpoint import save_model

    path = run_dir / "model.pt"
    save_model(model, path, card)
    write_json_atomic(run_dir / "model.json", card, indent=2)
    logger.info("exported %s", path)

    return path
