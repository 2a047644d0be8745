"""The ``deflow-synth`` command line: train a DeFlow model, degrade folders, inspect results."""

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import DeflowError

app = typer.Typer(
    name="deflow-synth",
    help="Learn a camera's degradation from unpaired images (DeFlow) and make LR/HR pairs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Where to run: auto picks CUDA when present.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random draw.")]
ModelOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--model",
        help="Native checkpoint (.pt) or official DeFlow .pth; default: the shipped model.",
    ),
]
YamlOpt = Annotated[
    Optional[Path],
    typer.Option("--yaml", help="YAML config of an official DeFlow .pth checkpoint."),
]


def fail(message: str, code: int = 1) -> None:
    """Print one error line on stderr and exit."""
    console.print(f"[bold red]Error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def info(model: ModelOpt = None, yaml: YamlOpt = None) -> None:
    """Show the version, the devices and a model's architecture and card."""
    from .checkpoint import describe_devices, describe_model

    out.print(f"deflow-synth {__version__}")
    out.print(describe_devices())
    out.print(describe_model(model, yaml), highlight=False)


# inspect: compare the degradation statistics of two folders


@app.command("inspect")
def inspect_folders(
    generated_dir: Annotated[
        Path, typer.Argument(help="Generated LR images (for example OUTPUT_DIR/lr of degrade).")
    ],
    real_dir: Annotated[Path, typer.Argument(help="Real degraded images, of any photos.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for inspect.json and .png.")],
    clean_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--clean",
            help="Clean (bicubic) counterparts of the generated images, same relative names: "
            "adds the exact statistics of generated minus clean.",
        ),
    ] = None,
) -> None:
    """Compare generated and real degraded images by noise, spectrum and colour statistics.

    Example: deflow-synth inspect pairs/lr photos/degraded --clean pairs/bicubic --out report
    """
    from rich.progress import Progress
    from rich.table import Table

    from .report import build_report, measure_folder, write_report

    folders = [("generated", generated_dir, clean_dir), ("real", real_dir, None)]
    measured = {}
    with Progress(console=console, transient=True) as progress:
        for role, folder, clean in folders:
            task = progress.add_task(f"measuring {role} images", total=None)
            measured[role] = measure_folder(
                folder, role, clean, on_image=lambda _, task=task: progress.advance(task)
            )

    report = build_report(measured["generated"], measured["real"])
    json_path, figure_path = write_report(report, out_dir)

    series = {"generated": report["generated"]["estimated"], "real": report["real"]["estimated"]}
    if report["generated"]["paired"] is not None:
        series["gen. - clean"] = report["generated"]["paired"]
    table = Table(title="Degradation statistics (std in 8-bit levels)")
    table.add_column("statistic")
    for name, summary in series.items():
        table.add_column(f"{name} ({summary['images']})", justify="right")
    for label, value in _inspect_rows():
        table.add_row(label, *[value(summary) for summary in series.values()])
    out.print(table)

    distance = report["distance"]
    out.print(
        f"distance generated-real: {_number(distance['total'])} (noise "
        f"{_number(distance['noise'])}, spectrum {_number(distance['spectrum'])}, colour "
        f"{_number(distance['color'])})"
    )
    out.print(f"report: {json_path}  figure: {figure_path}")

    problems = [item for entry in measured.values() for item in entry.skipped + entry.unpaired]
    for item in problems:
        console.print(f"[yellow]skipped[/] {item}", highlight=False)
    for item in (item for entry in measured.values() for item in entry.ignored):
        console.print(f"[dim]ignored {item}[/]", highlight=False)
    if problems:
        fail(f"{len(problems)} image(s) could not be measured in full; see the lines above")


def _number(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _inspect_rows() -> list:
    """(label, summary -> text) for each row of the inspect table."""
    levels = 255

    def channels(summary):
        return "/".join(_number(v, levels) for v in summary["channel_std"])

    def third(name):
        return lambda summary: _number(summary["intensity_std"][name], levels)

    return [
        ("noise std R/G/B", channels),
        ("std dark", third("low")),
        ("std mid", third("mid")),
        ("std bright", third("high")),
        ("high/low freq.", lambda s: _number(s["high_low_ratio"])),
        ("block steps", lambda s: _number(s["block_ratio"])),
        ("colour corr.", lambda s: _number(s["mean_color_correlation"])),
    ]


# train


class Preset(str, Enum):
    small = "small"
    aim_x8 = "aim-x8"
    ntire_x4 = "ntire-x4"


TRAIN_EXAMPLES = """
Examples:

  deflow-synth train --clean photos/ --degraded camera/ --out runs/camera

  deflow-synth train --clean photos/ --degraded camera/ --out runs/camera --resume

  torchrun --nproc_per_node 4 --no-python deflow-synth train --clean photos/ --degraded camera/
  --out runs/camera --preset ntire-x4
"""


@app.command(epilog=TRAIN_EXAMPLES)
def train(
    clean: Annotated[
        Path, typer.Option("--clean", help="Folder of clean HR photos (searched recursively).")
    ],
    degraded: Annotated[
        Path,
        typer.Option(
            "--degraded",
            help="Folder of real degraded images, at the resolution the SR model will be fed.",
        ),
    ],
    run_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Run folder: cache, log, checkpoint, sample sheets, model.pt and model.json.",
        ),
    ],
    scale: Annotated[
        Optional[int],
        typer.Option(
            "--scale", help="SR factor: clean photos are downsampled by it.", show_default="4"
        ),
    ] = None,
    preset: Annotated[
        Optional[Preset],
        typer.Option("--preset", help="Model size and training defaults.", show_default="small"),
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", help="Optimiser steps.", show_default="per preset")
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size",
            help="Patches per step and device, half from each domain.", show_default="per preset",
        ),
    ] = None,
    patch_size: Annotated[
        Optional[int],
        typer.Option(
            "--patch-size",
            help="Patch side at model resolution, a multiple of 8.", show_default="per preset",
        ),
    ] = None,
    lr: Annotated[
        Optional[float], typer.Option("--lr", help="Learning rate.", show_default="per preset")
    ] = None,
    shift_lr: Annotated[
        Optional[float],
        typer.Option(
            "--shift-lr", help="Learning rate of the domain shift.", show_default="per preset"
        ),
    ] = None,
    normalize_colors: Annotated[
        Optional[bool],
        typer.Option(
            "--normalize-colors/--no-normalize-colors",
            help="Map degraded images to clean colour statistics (on for aim-x8).",
        ),
    ] = None,
    paired: Annotated[
        Optional[Path],
        typer.Option(
            "--paired",
            help="Optional folder with aligned hr/ and lr/ pairs (same names) for Eq. 5.",
        ),
    ] = None,
    device: DeviceOpt = Device.auto,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed", help="Seed of the weights, the data order and all noise.", show_default="0"
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")
    ] = False,
    checkpoint_every: Annotated[
        Optional[int],
        typer.Option(
            "--checkpoint-every", help="Steps between checkpoints.", show_default="per preset"
        ),
    ] = None,
    validate_every: Annotated[
        Optional[int],
        typer.Option(
            "--validate-every",
            help="Steps between validations and sample sheets.", show_default="per preset",
        ),
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", help="Processes preparing the downsampled copies.")
    ] = min(8, os.cpu_count() or 1),
) -> None:
    """Learn a degradation from unpaired clean and degraded images (DeFlow)."""
    import logging

    from rich.logging import RichHandler

    from .log import logger
    from .train import DataFolders, resolve_config
    from .train import train as run_training

    # Only rank 0 of a torchrun launch talks to the terminal.
    main_rank = os.environ.get("RANK", "0") == "0"
    warnings = RichHandler(console=console, show_time=False, show_path=False)
    warnings.setLevel(logging.WARNING)
    if main_rank:
        logger.addHandler(warnings)
    try:
        config = resolve_config(
            run_dir,
            resume,
            preset.value if preset else None,
            scale=scale,
            steps=steps,
            batch_size=batch_size,
            patch_size=patch_size,
            lr=lr,
            shift_lr=shift_lr,
            normalize_colors=normalize_colors,
            seed=seed,
            checkpoint_every=checkpoint_every,
            validate_every=validate_every,
        )
        folders = DataFolders(clean, degraded, paired)
        with TrainProgress(enabled=main_rank) as progress:
            result = run_training(
                folders, run_dir, config, device=device.value, resume=resume, jobs=jobs,
                on_progress=progress.update,
            )
    finally:
        logger.removeHandler(warnings)

    if main_rank:
        out.print(train_summary(result))
    if result.interrupted:
        if main_rank:
            console.print(
                f"Stopped at step {result.step} of {result.total}; continue with the same "
                "command and --resume.",
                highlight=False,
            )
        raise typer.Exit(130)


class TrainProgress:
    """A rich progress bar fed by :class:`deflow_synth.train.Progress` reports."""

    def __init__(self, enabled: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]training"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.task is not None:
            self.bar.stop()

    def update(self, report) -> None:
        nll = "  ".join(f"{name} {value:.3f}" for name, value in report.nll.items())
        status = f"{nll} bits/dim  {report.steps_per_second:.2f} steps/s"
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("train", total=report.total, status=status)
        self.bar.update(self.task, completed=report.step, total=report.total, status=status)
        if report.validation:
            values = ", ".join(f"{k} {v:.4f}" for k, v in report.validation.items())
            self.bar.console.print(f"step {report.step}: validation NLL {values} bits/dim")


def train_summary(result):
    """The table printed at the end of ``train``."""
    from rich.table import Table

    table = Table(title="deflow-synth train", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rate = result.step / result.seconds if result.seconds else 0.0
    table.add_row("steps", f"{result.step} / {result.total}")
    table.add_row("time", f"{result.seconds / 60:.1f} min ({rate:.2f} steps/s overall)")
    for name, value in result.validation.items():
        table.add_row(f"NLL {name}", f"{value:.4f} bits/dim")
    table.add_row("images", ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    table.add_row("skipped files", str(len(result.skipped)))
    table.add_row("model", str(result.model) if result.model else "not exported yet")
    table.add_row("checkpoint", str(result.checkpoint))
    if result.sheet is not None:
        table.add_row("samples", str(result.sheet))
    table.add_row("log", str(result.run_dir / "train.log"))

    return table


# degrade: make LR/HR pairs from a folder of clean photos


class ImageFormat(str, Enum):
    png = "png"
    tiff = "tiff"
    bmp = "bmp"


DEGRADE_EXAMPLES = """
Examples:

  deflow-synth degrade photos/ pairs/

  deflow-synth degrade photos/ pairs/ --model runs/camera/model.pt --samples 4 --seed 7

  deflow-synth degrade photos/ pairs/ --model DeFlow-NTIRE-RWSR-100k.pth --yaml NTIRE.yml

  for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i deflow-synth degrade photos/ pairs/ --shard $i/4 &
  done
"""


@app.command(epilog=DEGRADE_EXAMPLES)
def degrade(
    input_dir: Annotated[
        Path, typer.Argument(help="Folder of clean HR images (searched recursively).")
    ],
    output_dir: Annotated[
        Path, typer.Argument(help="Destination of hr/, lr/, meta_info.txt and manifest.json.")
    ],
    model: ModelOpt = None,
    yaml: YamlOpt = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Degraded versions per HR image.")
    ] = 1,
    seed: SeedOpt = 0,
    temperature: Annotated[
        Optional[float],
        typer.Option(
            "--temperature",
            min=0.0,
            max=10.0,
            help="Scale of the random part of the shift u (default: the model card's "
            "calibrated temperature, else 1).",
        ),
    ] = None,
    scale: Annotated[
        int,
        typer.Option(
            "--scale", min=1, max=16, help="LR/HR factor of the pairs (not the model's)."
        ),
    ] = 4,
    device: DeviceOpt = Device.auto,
    tile: Annotated[
        Optional[int],
        typer.Option(
            "--tile",
            min=0,
            help="Tile side in LR pixels (default: from free memory); 0 translates whole images.",
        ),
    ] = None,
    overlap: Annotated[
        int, typer.Option("--overlap", min=0, help="Overlap of neighbouring tiles in LR pixels.")
    ] = 64,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            min=0,
            help="Processes reading and writing images (default: min(4, cores / 2)); 0: none.",
        ),
    ] = None,
    shard: Annotated[
        Optional[str],
        typer.Option("--shard", help="I/N: do only the I-th of N parts (0 <= I < N)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo images that are already finished.")
    ] = False,
    flat: Annotated[
        bool,
        typer.Option(
            "--flat", help="Join subfolders into file names (a/b.png -> a__b.png), for BasicSR."
        ),
    ] = False,
    image_format: Annotated[
        ImageFormat, typer.Option("--format", help="File format of the pairs.")
    ] = ImageFormat.png,
) -> None:
    """Make realistic LR/HR training pairs from a folder of clean HR images."""
    from .convert import DegradeOptions, degrade_folder, load_for_degrade, parse_shard

    device_name = resolve_device(device)
    deflow, model_info = load_for_degrade(model, yaml, device_name)
    if temperature is None:
        temperature = float(model_info.card.get("temperature", 1.0))

    options = DegradeOptions(
        scale=scale,
        samples=samples,
        seed=seed,
        temperature=temperature,
        tile=tile,
        overlap=overlap,
        device=device_name,
        workers=workers,
        overwrite=overwrite,
        shard=parse_shard(shard) if shard else (0, 1),
        flat=flat,
        image_format=image_format.value,
    )

    progress = DegradeProgress()
    try:
        with progress:
            summary = degrade_folder(
                input_dir,
                output_dir,
                deflow,
                model_info,
                options,
                on_start=progress.start,
                on_result=progress.update,
            )
    except KeyboardInterrupt:
        console.print(
            "Interrupted: unfinished pairs were removed; run the same command to resume.",
            highlight=False,
        )
        raise typer.Exit(130) from None

    out.print(degrade_summary(summary, output_dir))
    if summary.subfolders:
        console.print(
            "Note: pairs lie in subfolders, which BasicSR's PairedImageDataset does not search; "
            "use --flat for BasicSR.",
            highlight=False,
        )
    if summary.spaces:
        console.print(
            "Note: some file names contain spaces; BasicSR reads meta_info.txt only up to the "
            "first space, so use its folder mode (no meta_info_file) or rename them.",
            highlight=False,
        )
    if summary.failed:
        raise typer.Exit(1)


def resolve_device(device: Device) -> str:
    """``cpu`` or ``cuda``; ``auto`` is CUDA when present."""
    import torch

    if device is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device is Device.cuda and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")

    return device.value


class DegradeProgress:
    """A rich progress bar over the images of a degrade run, with images and megapixels per
    second; skipped and failed files are printed above it as they happen."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]degrading"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.started = 0.0
        self.done = 0
        self.megapixels = 0.0

    def __enter__(self) -> "DegradeProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.stop()

    def start(self, total: int) -> None:
        import time

        self.started = time.perf_counter()
        self.task = self.bar.add_task("degrade", total=total, rate="")

    def update(self, result) -> None:
        import time

        if result.status in ("skipped", "failed"):
            colour = "yellow" if result.status == "skipped" else "red"
            self.bar.console.print(
                f"[{colour}]{result.status}:[/] {result.message}", highlight=False
            )
        if result.status == "done":
            self.done += 1
            self.megapixels += result.megapixels
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rate = f"{self.done / seconds:.2f} img/s  {self.megapixels / seconds:.2f} MP/s"
        self.bar.update(self.task, advance=1, rate=rate)


def degrade_summary(summary, output_dir: Path):
    """The table printed at the end of ``degrade``."""
    from rich.table import Table

    table = Table(title="deflow-synth degrade", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("done", str(summary.done))
    table.add_row("already done", str(summary.resumed))
    table.add_row("skipped", str(summary.skipped))
    table.add_row("failed", str(summary.failed), style="red" if summary.failed else None)
    rate = summary.megapixels / summary.seconds if summary.seconds else 0.0
    table.add_row("HR megapixels", f"{summary.megapixels:.1f} ({rate:.2f} MP/s)")
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("pairs", str(output_dir))

    return table


def main() -> None:
    """Entry point: known errors become one stderr line and exit code 1."""
    try:
        app()
    except DeflowError as error:
        if os.environ.get("DEFLOW_SYNTH_DEBUG"):
            raise
        console.print(f"[bold red]Error:[/] {error}", highlight=False)
        sys.exit(1)
