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
    from .checkpoint import describe_model

    out.print(f"deflow-synth {__version__}")
    out.print(describe_model(model, yaml))


def main() -> None:
    """Entry point: known errors become one stderr line and exit code 1."""
    try:
        app()
    except DeflowError as error:
        if os.environ.get("DEFLOW_SYNTH_DEBUG"):
            raise
        console.print(f"[bold red]Error:[/] {error}", highlight=False)
        sys.exit(1)
