"""Turning a folder of clean HR photos into degraded LR/HR training pairs for BasicSR.

Per image: read the HR photo, crop it to a multiple of the scale, downsample it (MATLAB bicubic)
to the clean LR image, reflect-pad that to the model's size multiple, translate it to the
degraded domain with DeFlow (Eq. 8) tile by tile, crop the padding off and quantise to 8 bits.
Decoding, downsampling and PNG writing run in joblib (loky) worker processes beside the model.

Outputs go to ``OUTPUT_DIR/hr`` and ``OUTPUT_DIR/lr`` under the same relative names. Each
finished image gets a record in ``OUTPUT_DIR/.records``, written after its pairs; a run skips
images whose record and files exist, and rebuilds ``meta_info.txt`` and ``manifest.json`` from
all records at its end.
"""

import hashlib
import json
import os
import signal
import tempfile
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import write_json_atomic, write_text_atomic
from .errors import DeflowError
from .imageio import ImageError, UnusableImageError, read_image, write_image_atomic
from .log import logger
from .model import DeFlow
from .tiling import (
    DEFAULT_OVERLAP,
    auto_batch_size,
    auto_tile_size,
    draw_noise,
    rounded_tiling,
    tile_grid,
    translate_tiled,
)

__all__ = [
    "DegradeOptions",
    "ImageResult",
    "ModelInfo",
    "Summary",
    "degrade_folder",
    "image_seed",
    "list_images",
    "load_for_degrade",
    "output_names",
    "parse_shard",
    "shard_of",
]

RECORDS_DIR = ".records"
META_INFO = "meta_info.txt"
MANIFEST = "manifest.json"
EXTENSIONS = {"png": "PNG", "tiff": "TIFF", "bmp": "BMP"}
# Images prepared ahead of the model per worker, so that the model never waits for decoding.
PREFETCH_PER_WORKER = 2


@dataclass(frozen=True)
class DegradeOptions:
    """Settings of a degrade run; each field is one CLI option.

    Arguments:
        scale: LR/HR factor of the pairs (independent of the model's condition scale).
        samples: independent degraded versions written per HR image.
        seed: seed of every random draw; with the relative path it fixes each image's result.
        temperature: scale of the random part of the latent shift u.
        tile: tile side in LR (model-resolution) pixels; None picks one from free memory,
            0 translates each image in one piece.
        overlap: overlap of neighbouring tiles in LR pixels.
        device: ``"cpu"`` or ``"cuda"``.
        workers: joblib worker processes for reading and writing images; 0 does it in-process;
            None picks min(4, half the CPU cores), at least 1.
        batch_size: tiles per model call; None picks one from free memory on CUDA, 1 on CPU.
        overwrite: redo images that are already finished.
        shard: (index, count): only images with ``shard_of(path, count) == index`` are done.
        flat: write all pairs into ``hr/`` and ``lr/`` themselves, joining subfolder names with
            ``__`` (BasicSR's PairedImageDataset does not look into subfolders).
        image_format: ``"png"``, ``"tiff"`` or ``"bmp"``.
    """

    scale: int = 4
    samples: int = 1
    seed: int = 0
    temperature: float = 1.0
    tile: int | None = None
    overlap: int = DEFAULT_OVERLAP
    device: str = "cpu"
    workers: int | None = None
    batch_size: int | None = None
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    flat: bool = False
    image_format: str = "png"

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"scale: expected a positive integer, got {self.scale}")
        if self.samples < 1:
            raise ValueError(f"samples: expected at least 1, got {self.samples}")
        if self.image_format not in EXTENSIONS:
            raise ValueError(f"image_format: expected one of {sorted(EXTENSIONS)}")
        index, count = self.shard
        if not 0 <= index < count:
            raise ValueError(f"shard: expected 0 <= index < count, got {index}/{count}")

    def result_settings(self) -> dict[str, Any]:
        """The options that decide the pixels of a pair (tiling only changes them minutely)."""
        names = ("scale", "samples", "seed", "temperature", "flat", "image_format")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class ModelInfo:
    """What the manifest says about the model: an id, file hashes, architecture and card."""

    id: str
    path: str
    sha256: str
    config: dict[str, Any]
    yaml: str | None = None
    yaml_sha256: str | None = None
    card: dict[str, Any] = field(default_factory=dict)


def load_for_degrade(
    path: Path | None, yaml: Path | None, device: str
) -> tuple[DeFlow, ModelInfo]:
    """The model for a degrade run (the shipped default when ``path`` is None) and its info.

    Arguments:
        path: a native checkpoint or an official DeFlow .pth; None for the default model.
        yaml: the YAML config of an official checkpoint.
        device: where the model runs.
    """
    from .checkpoint import default_model_path, file_sha256, load_model, read_card

    if path is None:
        path = default_model_path()
        if not path.is_file():
            raise DeflowError(
                f"the default model is missing ({path}); pass --model with a checkpoint, "
                "for example the model.pt of a `deflow-synth train` run"
            )
    path = Path(path)
    model = load_model(path, yaml, device)
    card = read_card(path)

    info = ModelInfo(
        id=str(card.get("id") or path.name),
        path=str(path.resolve()),
        sha256=file_sha256(path),
        config=model.config.to_dict(),
        yaml=str(Path(yaml).resolve()) if yaml is not None else None,
        yaml_sha256=file_sha256(yaml) if yaml is not None else None,
        card=card,
    )
    return model, info


@dataclass(frozen=True)
class Pair:
    """One input image and the names of its outputs (the same under ``hr/`` and ``lr/``)."""

    source: str
    names: tuple[str, ...]


@dataclass
class ImageResult:
    """The outcome of one input image.

    ``status`` is ``"done"``, ``"resumed"`` (finished by an earlier run), ``"skipped"`` (an
    intact file this tool does not use) or ``"failed"`` (broken file or processing error).
    """

    source: str
    status: str
    message: str = ""
    megapixels: float = 0.0


@dataclass
class Summary:
    """Counts of a run, the time it took and what went wrong; whether any output name has a
    subfolder or a space (BasicSR's PairedImageDataset handles neither everywhere)."""

    done: int = 0
    resumed: int = 0
    skipped: int = 0
    failed: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0
    problems: list[ImageResult] = field(default_factory=list)
    subfolders: bool = False
    spaces: bool = False

    def add(self, result: ImageResult) -> None:
        setattr(self, result.status, getattr(self, result.status) + 1)
        self.megapixels += result.megapixels
        if result.status in ("skipped", "failed"):
            self.problems.append(result)


# Names, seeds and shards


def list_images(input_dir: Path, exclude: Path | None = None) -> list[str]:
    """Relative POSIX paths of all files under ``input_dir``, sorted; hidden names are left out.

    Arguments:
        input_dir: the folder to search, recursively.
        exclude: a folder to leave out (the output folder when it lies inside the input).
    """
    input_dir = Path(input_dir)
    excluded = Path(exclude).resolve() if exclude is not None else None
    if not input_dir.is_dir():
        raise DeflowError(f"{input_dir}: input folder not found")

    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (Path(root, d).resolve() != excluded)
        )
        for name in files:
            if not name.startswith("."):
                found.append(Path(root, name).relative_to(input_dir).as_posix())

    return sorted(found)


def output_names(sources: list[str], extension: str, samples: int, flat: bool) -> list[Pair]:
    """Output names for every source: ``a/b.jpg`` gives ``a/b.png`` (``a/b_s0.png``,
    ``a/b_s1.png``, ... with several samples).

    Sources that would share a name (``b.jpg`` and ``b.png``) keep their extension in it
    (``b.jpg.png``, ``b.png.png``); with ``flat``, subfolders are joined by ``__``. Names that
    still collide raise :class:`DeflowError`.
    """

    def base(source: str, keep_extension: bool) -> str:
        path = Path(source)
        stem = path.name if keep_extension else path.stem
        parent = path.parent.as_posix()
        if parent == ".":
            return stem
        return f"{parent.replace('/', '__')}__{stem}" if flat else f"{parent}/{stem}"

    bases = {source: base(source, False) for source in sources}
    counts = Counter(bases.values())
    bases = {s: base(s, True) if counts[b] > 1 else b for s, b in bases.items()}

    owners: dict[str, str] = {}
    for source, name in bases.items():
        if name in owners:
            raise DeflowError(
                f"{source} and {owners[name]} would both be written as {name}; rename one"
            )
        owners[name] = source

    suffixes = [""] if samples == 1 else [f"_s{k}" for k in range(samples)]
    return [
        Pair(source, tuple(f"{bases[source]}{suffix}.{extension}" for suffix in suffixes))
        for source in sources
    ]


def path_key(relative_path: str) -> bytes:
    """A relative path as bytes that are the same on every OS (NFC Unicode, '/' separators)."""
    return unicodedata.normalize("NFC", relative_path).encode("utf-8", "surrogateescape")


def image_seed(seed: int, relative_path: str, sample: int) -> int:
    """The seed of one sample of one image: a hash of the run seed, the path and the sample.

    It depends on nothing else (not the order, the shard, the workers or the tiling).

    Arguments:
        seed: the run's ``--seed``.
        relative_path: the input's path relative to the input folder, with '/' separators.
        sample: the sample index, 0 to K - 1.
    """
    text = f"{seed}\n".encode() + path_key(relative_path) + f"\n{sample}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def shard_of(relative_path: str, count: int) -> int:
    """The shard (0 to count - 1) an image belongs to, from a hash of its relative path."""
    digest = hashlib.sha256(b"shard\n" + path_key(relative_path)).digest()
    return int.from_bytes(digest[:8], "little") % count


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as (I, N), with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise DeflowError(f"--shard: expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise DeflowError(f"--shard: expected 0 <= I < N, got {text!r}")

    return index, count


# One image, in a worker


@dataclass
class Prepared:
    """An HR image cropped and written, and its clean LR image ready for the model.

    ``lr`` is the clean LR image reflect-padded to the model's size multiple, (H, W, 3) float32,
    and ``h`` its condition image; ``lr_size`` is the LR size before padding, (height, width).
    """

    lr: np.ndarray
    h: np.ndarray
    lr_size: tuple[int, int]
    input_size: tuple[int, int]
    crop: tuple[int, int, int, int]


def start_worker() -> None:
    """Worker start-up: one torch thread each, as the workers already run side by side, and
    Ctrl-C left to the main process, which lets running tasks finish before cleaning up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def prepare(
    source: Path,
    hr_paths: list[Path],
    scale: int,
    model_scale: int,
    multiple: int,
    image_format: str,
) -> Prepared:
    """Read, crop and write the HR image; return its clean LR image padded for the model.

    Arguments:
        source: the input file.
        hr_paths: where the cropped HR image goes (one path per sample).
        scale: the LR/HR factor.
        model_scale: the model's condition factor.
        multiple: the model's size multiple.
        image_format: a key of ``EXTENSIONS``.
    """
    from ._basicsr import imresize

    hr = read_image(source)
    height, width = hr.shape[:2]
    minimum = scale * multiple
    if height < minimum or width < minimum:
        raise UnusableImageError(
            f"{source}: {width}x{height} px is smaller than the minimum of {minimum}x{minimum} px "
            f"(LR sides of at least {multiple} px)"
        )

    # Crop the bottom and right rows that do not fill a whole LR pixel, as BasicSR's mod_crop.
    crop_height, crop_width = height // scale * scale, width // scale * scale
    hr = quantize(hr[:crop_height, :crop_width])
    write_pair_side(hr_paths, hr, image_format)

    # The LR image comes from the HR image as written, and stays unquantised like the clean
    # training images of the model.
    lr = downsample(hr, scale)
    lr_height, lr_width = lr.shape[:2]
    pad_height, pad_width = -lr_height % multiple, -lr_width % multiple
    lr = np.pad(lr, ((0, pad_height), (0, pad_width), (0, 0)), mode="reflect")
    h = imresize(lr, 1 / model_scale).astype(np.float32)

    return Prepared(lr, h, (lr_height, lr_width), (width, height), (0, 0, crop_width, crop_height))


def quantize(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] image to uint8 (clipped and rounded), with one float temporary."""
    scaled = image * 255
    np.clip(scaled, 0, 255, out=scaled)

    return np.rint(scaled, out=scaled).astype(np.uint8)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """MATLAB bicubic downsampling of a uint8 (H, W, 3) image by ``factor``, as float32 [0, 1].

    Channel by channel: the result is the same, and the peak memory a third.
    """
    from ._basicsr import imresize

    channels = [
        imresize(np.divide(image[:, :, c], 255, dtype=np.float32), 1 / factor)
        for c in range(image.shape[2])
    ]
    result = np.stack(channels, axis=2).astype(np.float32, copy=False)

    return np.clip(result, 0, 1, out=result)


def write_pair_side(paths: list[Path], image: np.ndarray, image_format: str) -> None:
    """Write one image under several names: the first is written, the others hard-linked."""
    pillow_format = EXTENSIONS[image_format]
    write_image_atomic(paths[0], image, pillow_format)
    for path in paths[1:]:
        link_atomic(paths[0], path, lambda p: write_image_atomic(p, image, pillow_format))


def link_atomic(source: Path, target: Path, fallback: Callable[[Path], None]) -> None:
    """Hard-link ``source`` as ``target`` via a temporary name; ``fallback`` writes a copy
    where the file system has no hard links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        fallback(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_lr(paths: list[Path], images: list[np.ndarray], image_format: str) -> None:
    """Write the degraded LR images, one per sample."""
    for path, image in zip(paths, images):
        write_image_atomic(path, image, EXTENSIONS[image_format])


# One image, on the model's device


def degrade_image(
    model: DeFlow,
    prepared: Prepared,
    seeds: list[int],
    options: DegradeOptions,
    tile: int | None,
    batch_size: int,
) -> list[np.ndarray]:
    """The degraded LR images (uint8 (h, w, 3)), one per seed.

    Arguments:
        model: the DeFlow model in eval mode, on ``options.device``.
        prepared: the clean LR image and its condition image.
        seeds: one seed per sample.
        options: the run's options (device, temperature, overlap).
        tile: tile side in LR pixels; None for one tile.
        batch_size: tiles per model call.
    """
    device = torch.device(options.device)
    cuda = device.type == "cuda"
    height, width = prepared.lr.shape[:2]

    x = torch.from_numpy(prepared.lr.transpose(2, 0, 1).copy())[None]
    h = torch.from_numpy(prepared.h.transpose(2, 0, 1).copy())[None]
    if cuda:
        # Pinned host memory lets the copies run asynchronously with the work already queued.
        x, h = x.pin_memory(), h.pin_memory()
    x, h = x.to(device, non_blocking=cuda), h.to(device, non_blocking=cuda)
    tiles = tile_grid(height, width, tile, options.overlap, model.config.size_multiple)

    images = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        noise = draw_noise(model, height, width, generator)
        noise = (noise.pin_memory() if cuda else noise).to(device, non_blocking=cuda)

        y = translate_tiled(model, x, h, noise, tiles, options.temperature, batch_size)

        y = y[0, :, : prepared.lr_size[0], : prepared.lr_size[1]].clamp(0, 1)
        images.append((y * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())

    return images


# The folder


class InlineExecutor:
    """Runs submitted work at once in this process (``workers=0``)."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:  # noqa: BLE001 - kept in the future, as a worker would
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def make_executor(workers: int):
    if workers == 0:
        return InlineExecutor()
    from joblib.externals.loky import get_reusable_executor

    return get_reusable_executor(max_workers=workers, initializer=start_worker)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def free_memory(device: str) -> int:
    """Bytes available on the device (the CPU's available RAM, or free CUDA memory)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tile_and_batch(model: DeFlow, options: DegradeOptions) -> tuple[int | None, int]:
    """The tile side (None: untiled) and tiles per batch for this run."""
    kind = "cuda" if options.device.startswith("cuda") else "cpu"
    free = free_memory(options.device)
    if options.tile == 0:
        tile = None
    elif options.tile is None:
        tile = auto_tile_size(model.config, kind, free)
    else:
        tile = options.tile
    if tile is not None:
        try:
            rounded_tiling(tile, options.overlap, model.config.size_multiple)
        except ValueError:
            raise DeflowError(
                f"--overlap {options.overlap} must be smaller than the tile side {tile} (both "
                f"rounded to multiples of {model.config.size_multiple})"
            ) from None

    if options.batch_size is not None:
        return tile, options.batch_size
    if kind == "cpu" or tile is None:
        return tile, 1
    return tile, auto_batch_size(model.config, tile, free)


@dataclass
class Job:
    """An image on its way through the pipeline."""

    pair: Pair
    seeds: list[int]
    prepared: Future | None = None
    written: Future | None = None
    result: ImageResult | None = None
    record: dict[str, Any] | None = None


def degrade_folder(
    input_dir: Path,
    output_dir: Path,
    model: DeFlow,
    model_info: ModelInfo,
    options: DegradeOptions,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
) -> Summary:
    """Write LR/HR pairs for every image of ``input_dir`` (in this shard) to ``output_dir``.

    Bad files are skipped or failed with a message naming them; the rest carries on. On an
    interruption (KeyboardInterrupt included), the pairs of unfinished images are removed and
    the index files rebuilt, so that a new run resumes cleanly.

    Arguments:
        input_dir: folder of clean HR images (searched recursively).
        output_dir: destination of ``hr/``, ``lr/``, ``meta_info.txt`` and ``manifest.json``.
        model: the DeFlow model in eval mode, on ``options.device``.
        model_info: the model's description for the manifest.
        options: see :class:`DegradeOptions`.
        on_start: called with the number of images of this shard once they are listed.
        on_result: called with each image's :class:`ImageResult`.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_folders(input_dir, output_dir)
    started = time.perf_counter()
    summary = Summary()
    settings = run_settings(model_info, options)
    tile, batch_size = tile_and_batch(model, options)

    sources = list_images(input_dir, exclude=output_dir)
    if not sources:
        raise DeflowError(f"{input_dir}: the input folder holds no files")
    pairs = output_names(sources, options.image_format, options.samples, options.flat)
    pairs = [p for p in pairs if shard_of(p.source, options.shard[1]) == options.shard[0]]
    summary.subfolders = any("/" in name for pair in pairs for name in pair.names)
    summary.spaces = any(" " in name for pair in pairs for name in pair.names)
    if not options.overwrite:
        check_settings(output_dir, pairs, settings)
    if on_start is not None:
        on_start(len(pairs))

    def report(result: ImageResult) -> None:
        summary.add(result)
        if on_result is not None:
            on_result(result)

    pending = []
    for pair in pairs:
        if not options.overwrite and is_finished(output_dir, pair, settings):
            report(ImageResult(pair.source, "resumed"))
        else:
            seeds = [image_seed(options.seed, pair.source, k) for k in range(options.samples)]
            pending.append(Job(pair, seeds))

    try:
        tiling = (tile, batch_size)
        run_jobs(input_dir, output_dir, model, options, tiling, settings, pending, report)
    finally:
        write_index(output_dir, settings)
    summary.seconds = time.perf_counter() - started

    return summary


def run_jobs(
    input_dir: Path,
    output_dir: Path,
    model: DeFlow,
    options: DegradeOptions,
    tiling: tuple[int | None, int],
    settings: dict[str, Any],
    jobs: list[Job],
    report: Callable[[ImageResult], None],
) -> None:
    """Prepare in workers, translate here, write in workers; clean up if interrupted."""
    workers = default_workers() if options.workers is None else options.workers
    executor = make_executor(workers)
    tile, batch_size = tiling
    waiting, in_flight = deque(jobs), deque()
    writing: list[Job] = []
    active: dict[int, Job] = {}

    def submit(fn: Callable, *args: Any) -> Future:
        nonlocal executor
        try:
            return executor.submit(fn, *args)
        except RuntimeError:
            # A worker that died (a crashing decoder, say) breaks the pool; loky makes a new one.
            executor = make_executor(workers)
            return executor.submit(fn, *args)

    def submit_prepare() -> None:
        while waiting and len(in_flight) < max(1, workers) * PREFETCH_PER_WORKER:
            job = waiting.popleft()
            active[id(job)] = job
            hr_paths = [output_dir / "hr" / name for name in job.pair.names]
            job.prepared = submit(
                prepare,
                input_dir / job.pair.source,
                hr_paths,
                options.scale,
                model.config.scale,
                model.config.size_multiple,
                options.image_format,
            )
            in_flight.append(job)

    def close(job: Job) -> None:
        finish(job, output_dir, settings, report)
        del active[id(job)]

    try:
        submit_prepare()
        while in_flight:
            job = in_flight.popleft()
            lr_images = translate_job(job, model, options, tile, batch_size)
            submit_prepare()
            if lr_images is None:
                close(job)
                continue
            lr_paths = [output_dir / "lr" / name for name in job.pair.names]
            job.written = submit(write_lr, lr_paths, lr_images, options.image_format)
            writing.append(job)
            writing = close_written(writing, close, block=False)
        close_written(writing, close, block=True)
    except BaseException:
        for job in active.values():
            for future in (job.prepared, job.written):
                if future is not None:
                    future.cancel()
        executor.shutdown(wait=True)
        for job in active.values():
            remove_outputs(output_dir, job.pair)
        raise
    # Workers left idle would keep the interpreter waiting for them at exit.
    executor.shutdown(wait=True)


def translate_job(
    job: Job, model: DeFlow, options: DegradeOptions, tile: int | None, batch_size: int
) -> list[np.ndarray] | None:
    """Wait for the job's prepared image and translate it; None (and a result) on failure."""
    try:
        prepared = job.prepared.result()
    except UnusableImageError as error:
        job.result = ImageResult(job.pair.source, "skipped", str(error))
        return None
    except ImageError as error:
        job.result = ImageResult(job.pair.source, "failed", str(error))
        return None
    except Exception as error:  # noqa: BLE001 - one bad image must not stop the batch
        job.result = failure(job.pair.source, "reading", error)
        return None

    try:
        images = degrade_image(model, prepared, job.seeds, options, tile, batch_size)
    except torch.OutOfMemoryError:
        message = f"{job.pair.source}: out of memory; try a smaller --tile (now {tile})"
        job.result = ImageResult(job.pair.source, "failed", message)
        return None
    except Exception as error:  # noqa: BLE001 - one bad image must not stop the batch
        job.result = failure(job.pair.source, "degrading", error)
        return None

    width, height = prepared.crop[2], prepared.crop[3]
    job.result = ImageResult(job.pair.source, "done", megapixels=width * height / 1e6)
    job.record = {
        "source": job.pair.source,
        "names": list(job.pair.names),
        "seeds": job.seeds,
        "input_size": list(prepared.input_size),
        "crop": list(prepared.crop),
        "lr_size": [prepared.lr_size[1], prepared.lr_size[0]],
        "tile": tile,
        "overlap": options.overlap if tile is not None else None,
    }

    return images


def failure(source: str, stage: str, error: Exception) -> ImageResult:
    logger.debug("%s failed while %s", source, stage, exc_info=error)
    return ImageResult(source, "failed", f"{source}: error while {stage}: {error!r}")


def close_written(jobs: list[Job], close: Callable[[Job], None], block: bool) -> list[Job]:
    """Close the jobs whose LR images are written (all of them if ``block``); return the rest."""
    remaining = []
    for job in jobs:
        if block or job.written.done():
            try:
                job.written.result()
            except Exception as error:  # noqa: BLE001 - one bad image must not stop the batch
                job.result = failure(job.pair.source, "writing", error)
            close(job)
        else:
            remaining.append(job)

    return remaining


def finish(job: Job, output_dir: Path, settings: dict, report: Callable) -> None:
    """Write the record of a done job, or remove the outputs of a failed one; report it."""
    if job.result.status == "done":
        record = {**job.record, "settings": settings["key"]}
        write_json_atomic(record_path(output_dir, job.pair.names[0]), record)
    else:
        remove_outputs(output_dir, job.pair)
    report(job.result)


# Records, resume and the index files


def run_settings(model_info: ModelInfo, options: DegradeOptions) -> dict[str, Any]:
    """What decides the results of a run, and a short key of it stored in every record."""
    decisive = {"model_sha256": model_info.sha256, **options.result_settings()}
    key = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]

    return {
        "key": key,
        "model": asdict(model_info),
        "options": {**options.result_settings(), "overlap": options.overlap},
    }


def record_path(output_dir: Path, name: str) -> Path:
    return output_dir / RECORDS_DIR / f"{name}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return None


def is_finished(output_dir: Path, pair: Pair, settings: dict[str, Any]) -> bool:
    """Whether a record with these settings and all files of the pair exist."""
    record = read_record(record_path(output_dir, pair.names[0]))
    if record is None or record.get("settings") != settings["key"]:
        return False
    if record.get("source") != pair.source:
        return False

    return all(
        (output_dir / side / name).is_file() for side in ("hr", "lr") for name in pair.names
    )


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """Refuse output folders that would overwrite the input, and ones that cannot be written."""
    source, target = input_dir.resolve(), output_dir.resolve()
    if source == target:
        raise DeflowError(f"{output_dir}: the output folder must not be the input folder")
    if source.is_relative_to(target):
        raise DeflowError(
            f"{input_dir}: the input folder lies inside the output folder {output_dir}, whose "
            "files would overwrite it; choose another output folder"
        )
    if not input_dir.is_dir():
        raise DeflowError(f"{input_dir}: input folder not found")

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise DeflowError(f"{output_dir}: cannot write to the output folder ({error})") from error


def check_settings(output_dir: Path, pairs: list[Pair], settings: dict[str, Any]) -> None:
    """Refuse to mix pairs made with other settings (model, seed, scale, samples, format, ...)
    into a folder: any finished pair there must carry this run's settings key."""
    records = output_dir / RECORDS_DIR
    for path in sorted(records.rglob("*.json")) if records.is_dir() else []:
        record = read_record(path)
        if record is not None and record.get("settings") != settings["key"]:
            name = path.relative_to(records).with_suffix("")
            raise DeflowError(
                f"{output_dir}: holds pairs made with other settings (such as {name}); "
                "use --overwrite to redo them or choose another folder"
            )


def remove_outputs(output_dir: Path, pair: Pair) -> None:
    """Delete the files of an unfinished pair, its record and any temporary files."""
    record_path(output_dir, pair.names[0]).unlink(missing_ok=True)
    for side in ("hr", "lr"):
        for name in pair.names:
            path = output_dir / side / name
            path.unlink(missing_ok=True)
            if path.parent.is_dir():
                for temporary in path.parent.glob(f".{glob_escape(path.name)}.*tmp"):
                    temporary.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def write_index(output_dir: Path, settings: dict[str, Any]) -> None:
    """Rebuild ``meta_info.txt`` and ``manifest.json`` from every record with these settings."""
    records_dir = output_dir / RECORDS_DIR
    if not records_dir.is_dir():
        return
    records = []
    for path in sorted(records_dir.rglob("*.json")):
        record = read_record(path)
        if record is not None and record.get("settings") == settings["key"]:
            records.append(record)
    records.sort(key=lambda r: r["names"][0])

    lines = []
    for record in records:
        width, height = record["crop"][2], record["crop"][3]
        lines += [f"{name} ({height},{width},3)\n" for name in record["names"]]
    write_text_atomic(output_dir / META_INFO, "".join(lines))

    manifest = {
        "tool": "deflow-synth",
        "version": __version__,
        "model": settings["model"],
        "options": settings["options"],
        "pairs": [{k: v for k, v in r.items() if k != "settings"} for r in records],
    }
    write_json_atomic(output_dir / MANIFEST, manifest)
