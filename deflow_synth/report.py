"""Comparing two image folders by their degradation statistics: the ``inspect`` report.

A folder of generated LR images is compared with a folder of real degraded images, neither
of which needs to show the same photos. Each image is read, its residual estimated and its
statistics merged into the folder's (see :mod:`deflow_synth.stats`). Given the clean
counterparts of the generated images, the exact residuals (generated minus clean) are
measured as well. The report is a JSON-ready dict, written with a PNG figure of its curves.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import stats
from .atomic import write_json_atomic
from .data import SkippedFile, list_images, match_pairs
from .errors import DeflowError
from .imageio import ImageError, read_image

__all__ = ["FolderStatistics", "build_report", "measure_folder", "write_report"]

JSON_NAME = "inspect.json"
FIGURE_NAME = "inspect.png"


@dataclass
class FolderStatistics:
    """Merged statistics of one folder and the files left out.

    Arguments:
        folder: the folder measured.
        estimated: no-reference statistics, None when no image could be measured.
        paired: statistics of image minus clean counterpart, None without counterparts.
        clean_folder: the folder of clean counterparts, if any.
        skipped: images that could not be measured (unreadable or too small).
        unpaired: measured images left out of the paired statistics (no usable counterpart).
        ignored: files that are not images.
    """

    folder: Path
    estimated: stats.ResidualStatistics | None = None
    paired: stats.ResidualStatistics | None = None
    clean_folder: Path | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    unpaired: list[SkippedFile] = field(default_factory=list)
    ignored: list[SkippedFile] = field(default_factory=list)


def _accumulate(total, item):
    return item if total is None else stats.merge([total, item])


def _estimated_statistics(image: np.ndarray, path: Path) -> stats.ResidualStatistics:
    radius = stats.smoothing_radius()
    min_side = stats.TILE_SIZE + 2 * radius
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(f"{path}: {width}x{height} px, too small to measure (under {min_side})")

    residual, intensity = stats.estimate_residual(image.astype(np.float64))

    mask = stats.flat_mask(residual, intensity)

    return stats.image_statistics(residual, intensity, mask, offset=radius)


def _paired_statistics(image: np.ndarray, clean_path: Path) -> stats.ResidualStatistics:
    clean = read_image(clean_path).astype(np.float64)
    if clean.shape != image.shape:
        raise ImageError(
            f"{clean_path}: clean counterpart is {clean.shape[1]}x{clean.shape[0]} px, "
            f"the generated image {image.shape[1]}x{image.shape[0]} px"
        )

    residual, intensity = stats.paired_residual(image.astype(np.float64), clean)
    quantum = min(stats.quantization_step(image), stats.quantization_step(clean))

    return stats.image_statistics(residual, intensity, quantum=quantum)


def _reason(error: ImageError, path: Path) -> str:
    return str(error).removeprefix(f"{path}: ")


def _measure_pair(
    result: FolderStatistics, image: np.ndarray, path: Path, clean_path: Path | None
) -> None:
    if clean_path is None:
        reason = f"no clean counterpart of the same name in {result.clean_folder}"
        result.unpaired.append(SkippedFile(path, reason))
        return

    try:
        result.paired = _accumulate(result.paired, _paired_statistics(image, clean_path))
    except ImageError as error:
        result.unpaired.append(SkippedFile(path, _reason(error, path)))


def measure_folder(
    folder: Path,
    role: str,
    clean_folder: Path | None = None,
    on_image: Callable[[Path], None] | None = None,
) -> FolderStatistics:
    """Degradation statistics of every image under a folder (recursively).

    An image that cannot be measured is recorded in ``skipped`` and the others carry on.
    Raises DeflowError when the folder holds no image that can be measured.

    Arguments:
        folder: the images.
        role: what the folder holds, for messages ("generated", "real").
        clean_folder: clean counterparts with the same relative names (any image suffix).
        on_image: called with each image's path once it is done (for progress display).
    """
    paths, ignored = list_images(folder, role)
    result = FolderStatistics(folder=folder, clean_folder=clean_folder, ignored=ignored)
    counterparts = {}
    if clean_folder is not None:
        clean_paths, _ = list_images(clean_folder, "clean")
        counterparts = dict(match_pairs(paths, folder, clean_paths, clean_folder)[0])

    for path in paths:
        try:
            image = read_image(path)
            result.estimated = _accumulate(result.estimated, _estimated_statistics(image, path))
        except ImageError as error:
            result.skipped.append(SkippedFile(path, _reason(error, path)))
            image = None
        if image is not None and clean_folder is not None:
            _measure_pair(result, image, path, counterparts.get(path))
        if on_image is not None:
            on_image(path)

    if result.estimated is None:
        raise DeflowError(f"{role} folder {folder}: no image could be measured")

    return result


def _file_list(items: list[SkippedFile]) -> list[dict]:
    return [{"path": str(item.path), "reason": item.reason} for item in items]


def _folder_entry(measured: FolderStatistics) -> dict:
    return {
        "folder": str(measured.folder),
        "clean_folder": None if measured.clean_folder is None else str(measured.clean_folder),
        "estimated": stats.summarize(measured.estimated),
        "paired": None if measured.paired is None else stats.summarize(measured.paired),
        "skipped": _file_list(measured.skipped),
        "unpaired": _file_list(measured.unpaired),
    }


def build_report(generated: FolderStatistics, real: FolderStatistics) -> dict:
    """The JSON-ready report: both folders' summaries and the distance between them.

    Arguments:
        generated: statistics of the generated images.
        real: statistics of the real degraded images.
    """
    report = {
        "estimator": {
            "residual": "image minus Gaussian-smoothed image, scaled to unit gain on white noise",
            "smoothing_sigma": stats.SMOOTHING_SIGMA,
            "flat_fraction": stats.FLAT_FRACTION,
            "noise_std": "1.4826 x median |residual| (robust standard deviation)",
            "units": "intensities in [0, 1]; power in [0, 1]^2 per frequency bin",
        },
        "generated": _folder_entry(generated),
        "real": _folder_entry(real),
    }
    report["distance"] = stats.summary_distance(
        report["generated"]["estimated"], report["real"]["estimated"]
    )

    return report


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write the report as JSON and its figure as PNG into a folder, each file atomically.

    Arguments:
        report: from :func:`build_report`.
        out_dir: the folder (created if needed).

    Returns:
        the paths of the JSON file and of the figure.
    """
    from .chart import report_figure
    from .imageio import write_png_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, figure_path = out_dir / JSON_NAME, out_dir / FIGURE_NAME

    write_json_atomic(json_path, report, indent=2)
    write_png_atomic(figure_path, np.asarray(report_figure(report)))

    return json_path, figure_path
