"""Training data: image folders, cached copies at model resolution, and random patches.

Both domains live at the *model resolution*: clean HR photos are downsampled once by the SR
scale with MATLAB-style bicubic and cached as 16-bit arrays in the run folder; degraded images
are cached as they are. Patches are drawn so that every batch is a pure function of the seed
and the step, which is what lets an interrupted run resume exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ._basicsr import imresize
from .atomic import atomic_write
from .errors import DeflowError
from .log import logger
from .shift import CLEAN, DEGRADED

if TYPE_CHECKING:
    from .model import DeFlow
    from .train import DataFolders, TrainConfig

__all__ = [
    "CachedImage",
    "PatchBatch",
    "PatchSampler",
    "SkippedFile",
    "cache_images",
    "cache_pairs",
    "color_statistics",
    "condition_images",
    "list_images",
    "match_pairs",
    "shard",
    "split_held_out",
    "to_tensor",
    "TrainingData",
]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)

# Cached arrays hold [0, 1] values as 16-bit integers: finer than any 8-bit input, half the
# disk of float32. Bump the version whenever the cached content changes meaning.
CACHE_LEVELS = 65535
CACHE_VERSION = 1

# Separate draws for every sampler and noise source that share the run's seed.
CLEAN_STREAM, DEGRADED_STREAM, PAIRED_STREAM, NOISE_STREAM = 0, 1, 2, 3
VALIDATION_STREAM = 100

# Held out for validation: about 10 % of each domain's images, at most 4, when 3 remain.
HELD_OUT_FRACTION = 0.1
MAX_HELD_OUT = 4
MIN_TRAINING_IMAGES = 3


@dataclass(frozen=True)
class SkippedFile:
    """A file that cannot be used, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class CachedImage:
    """One usable image: its source file and its cached copy at model resolution.

    Arguments:
        source: the user's image file.
        array: the cached (H, W, 3) uint16 .npy file.
        height: rows of the cached copy.
        width: columns of the cached copy.
    """

    source: Path
    array: Path
    height: int
    width: int

    def crop(self, top: int, left: int, size: int) -> np.ndarray:
        """The (size, size, 3) float32 patch at (top, left), values in [0, 1]."""
        cached = np.load(self.array, mmap_mode="r")
        patch = np.asarray(cached[top : top + size, left : left + size], dtype=np.float32)

        return patch / CACHE_LEVELS

    def load(self) -> np.ndarray:
        """The whole cached image, (H, W, 3) float32 in [0, 1]."""
        return self.crop(0, 0, max(self.height, self.width))


# Folders


def list_images(folder: Path, role: str) -> tuple[list[Path], list[SkippedFile]]:
    """Image files under ``folder`` (recursively, sorted) and the other files found there.

    Hidden files are ignored. Raises DeflowError when the folder does not exist or holds no
    file at all with an image suffix.

    Arguments:
        folder: the folder to scan.
        role: what the folder holds, for messages ("clean", "degraded", ...).
    """
    if not folder.is_dir():
        raise DeflowError(f"{role} folder {folder} does not exist or is not a folder")

    images, others = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            others.append(SkippedFile(path, f"not an image file (suffix {path.suffix!r})"))

    if not images:
        raise DeflowError(
            f"{role} folder {folder} holds no images "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )

    return images, others


def match_pairs(
    hr_paths: Sequence[Path], hr_root: Path, lr_paths: Sequence[Path], lr_root: Path
) -> tuple[list[tuple[Path, Path]], list[SkippedFile]]:
    """(HR, LR) files with the same relative name (the suffix may differ), and the unmatched."""

    def key(path: Path, root: Path) -> str:
        return path.relative_to(root).with_suffix("").as_posix()

    lr_by_key = {key(p, lr_root): p for p in lr_paths}
    pairs, unmatched = [], []
    for hr in hr_paths:
        lr = lr_by_key.pop(key(hr, hr_root), None)
        if lr is None:
            unmatched.append(SkippedFile(hr, f"no LR image of the same name in {lr_root}"))
        else:
            pairs.append((hr, lr))
    for lr in lr_by_key.values():
        unmatched.append(SkippedFile(lr, f"no HR image of the same name in {hr_root}"))

    return pairs, unmatched


# Cache


@dataclass(frozen=True)
class _CacheResult:
    shape: tuple[int, int] | None
    error: str | None
    note: str | None = None


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})


def conversion_note(path: Path) -> str | None:
    """What reading the file as 8-bit-or-better RGB changes, from its header; None if nothing."""
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        alpha = mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info)
        sixteen = mode.startswith("I;16") or any("16" in str(tile.args) for tile in image.tile)

    notes = []
    if sixteen:
        notes.append("16-bit values read at full precision")
    if mode in GRAYSCALE_MODES:
        notes.append("grayscale, repeated over R, G and B")
    if mode == "CMYK":
        notes.append("CMYK, converted to RGB")
    if alpha:
        notes.append("transparency composited over white")

    return "; ".join(notes) or None


def cache_name(source: Path, downscale: int) -> str:
    """File name of the cached copy: changes whenever the source file or the scale does."""
    stat = source.stat()
    fingerprint = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{downscale}"
    digest = hashlib.sha1(f"{fingerprint}|{CACHE_VERSION}".encode()).hexdigest()[:16]

    return f"{source.stem[:40]}-{digest}.npy"


def _cache_one(source: Path, downscale: int, target: Path) -> _CacheResult:
    from .imageio import ImageError, read_image

    if target.exists():
        try:
            return _CacheResult(np.load(target, mmap_mode="r").shape[:2], None)
        except (OSError, ValueError):
            logger.info("rebuilding unreadable cache file %s", target)

    try:
        image = read_image(source)
        note = conversion_note(source)
    except ImageError as error:
        return _CacheResult(None, str(error).removeprefix(f"{source}: "))
    if downscale > 1:
        image = np.clip(imresize(image, 1 / downscale), 0, 1)

    quantized = np.round(image * CACHE_LEVELS).astype(np.uint16)
    with atomic_write(target) as file:
        np.save(file, quantized)

    return _CacheResult(quantized.shape[:2], None, note)


def cache_images(
    paths: Sequence[Path], downscale: int, cache_dir: Path, min_side: int, jobs: int = 1
) -> tuple[list[CachedImage], list[SkippedFile]]:
    """Read, downsample and cache images in parallel; return the usable ones and the skipped.

    Copies already in ``cache_dir`` are reused, so a resumed run prepares nothing again.

    Arguments:
        paths: image files.
        downscale: integer factor of the MATLAB-style bicubic downsampling (1 keeps the size).
        cache_dir: folder of the cached arrays (created if needed).
        min_side: images whose cached copy is smaller than this on a side are skipped.
        jobs: joblib worker processes (1 works in this process).
    """
    from joblib import Parallel, delayed

    cache_dir.mkdir(parents=True, exist_ok=True)
    targets = [cache_dir / cache_name(path, downscale) for path in paths]
    if jobs > 1:
        work = (delayed(_cache_one)(p, downscale, t) for p, t in zip(paths, targets, strict=True))
        results = Parallel(n_jobs=jobs)(work)
    else:
        results = [_cache_one(p, downscale, t) for p, t in zip(paths, targets, strict=True)]

    images, skipped = [], []
    for path, target, result in zip(paths, targets, results, strict=True):
        if result.error is not None:
            skipped.append(SkippedFile(path, result.error))
            continue
        if result.note is not None:
            logger.warning("%s: %s", path, result.note)
        height, width = result.shape
        if min(height, width) < min_side:
            resized = f" after downsampling by {downscale}" if downscale > 1 else ""
            skipped.append(SkippedFile(
                path, f"{width}x{height} px{resized}, smaller than the {min_side}-px patch"
            ))
            continue
        images.append(CachedImage(path, target, height, width))

    return images, skipped


def cache_pairs(
    pairs: Sequence[tuple[Path, Path]],
    downscale: int,
    cache_dir: Path,
    min_side: int,
    jobs: int = 1,
) -> tuple[list[tuple[CachedImage, CachedImage]], list[SkippedFile]]:
    """Cache aligned (HR, LR) pairs: the HR image downsampled by ``downscale`` must have the
    LR image's size. Returns the usable (clean, degraded) pairs and the skipped files."""
    clean, skipped = cache_images([hr for hr, _ in pairs], downscale, cache_dir, min_side, jobs)
    degraded, lr_skipped = cache_images([lr for _, lr in pairs], 1, cache_dir, min_side, jobs)
    skipped += lr_skipped

    clean_by_source = {image.source: image for image in clean}
    degraded_by_source = {image.source: image for image in degraded}
    usable = []
    for hr, lr in pairs:
        x, y = clean_by_source.get(hr), degraded_by_source.get(lr)
        if x is None or y is None:
            continue
        if (x.height, x.width) != (y.height, y.width):
            skipped.append(SkippedFile(lr, (
                f"{y.width}x{y.height} px, but its HR partner {hr.name} downsampled by "
                f"{downscale} is {x.width}x{x.height} px"
            )))
            continue
        usable.append((x, y))

    return usable, skipped


# Splits


def split_held_out(
    images: Sequence, fraction: float, max_count: int, min_train: int
) -> tuple[list, list]:
    """(training, held-out) with evenly spaced held-out items; none when too few remain."""
    count = min(max_count, int(len(images) * fraction))
    if len(images) - count < min_train or count == 0:
        return list(images), []

    stride = len(images) / count
    held = {int(stride * (i + 0.5)) for i in range(count)}

    training = [item for i, item in enumerate(images) if i not in held]
    return training, [images[i] for i in sorted(held)]


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of one rank under data parallelism; all of them when there are too few."""
    if len(items) < world_size:
        return list(items)

    return list(items[rank::world_size])


# Statistics


def color_statistics(images: Sequence[CachedImage]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (3,) over every pixel of the images."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for image in images:
        pixels = image.load().reshape(-1, 3).astype(np.float64)
        total += pixels.sum(0)
        squares += (pixels**2).sum(0)
        count += len(pixels)

    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0))


# Patches


class PatchSampler:
    """Random square patches with random flips, from groups of equally sized images.

    A group is one image for unpaired data, or (clean, degraded) for aligned pairs: the same
    crop and flips are applied to every member. Images are picked in proportion to their area.
    Every draw is a pure function of (seed, stream, step, rank).

    Arguments:
        groups: sequences of CachedImage of equal size.
        patch_size: side P of the patches.
        seed: the run's seed.
        stream: separates the draws of different samplers with the same seed.
        alignment: crop offsets are multiples of this, so that block-structured degradations
            (JPEG and video codecs work on 8x8 blocks) keep their grid relative to the flow's
            squeeze levels.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[CachedImage]],
        patch_size: int,
        seed: int,
        stream: int,
        alignment: int = 1,
    ):
        if not groups:
            raise ValueError("PatchSampler needs at least one image")
        self.groups = [tuple(group) for group in groups]
        self.patch_size = patch_size
        self.seed = seed
        self.stream = stream
        self.alignment = alignment

        areas = np.array([g[0].height * g[0].width for g in self.groups], dtype=np.float64)
        self.weights = areas / areas.sum()

    def offset(self, rng: np.random.Generator, length: int) -> int:
        """A random crop start along a side of ``length``, a multiple of the alignment."""
        positions = (length - self.patch_size) // self.alignment + 1
        return self.alignment * int(rng.integers(positions))

    def draw(self, step: int, count: int, rank: int = 0) -> list[np.ndarray]:
        """One (count, P, P, 3) float32 array per group member."""
        rng = np.random.default_rng([self.seed, self.stream, step, rank])
        size = self.patch_size
        picks = rng.choice(len(self.groups), size=count, p=self.weights)

        members = [[] for _ in self.groups[0]]
        for index in picks:
            group = self.groups[index]
            top = self.offset(rng, group[0].height)
            left = self.offset(rng, group[0].width)
            flip_rows, flip_columns = rng.random(2) < 0.5
            for patches, image in zip(members, group, strict=True):
                patch = image.crop(top, left, size)
                patch = patch[::-1] if flip_rows else patch
                patches.append(patch[:, ::-1] if flip_columns else patch)

        return [np.ascontiguousarray(np.stack(patches)) for patches in members]


def condition_images(patches: np.ndarray, scale: int) -> np.ndarray:
    """The condition image h of every patch: (N, P, P, 3) downsampled to (N, P/s, P/s, 3)."""
    return np.stack([imresize(patch, 1 / scale) for patch in patches]).astype(np.float32)


# Training batches


@dataclass
class PatchBatch:
    """One step's tensors; x is clean patches then degraded ones, h their condition images."""

    x: Tensor  # (B, 3, P, P)
    h: Tensor  # (B, 3, P / s, P / s)
    domain: Tensor  # (B,) CLEAN or DEGRADED
    cond_noise: Tensor  # like h
    dequant_noise: Tensor  # like x
    pairs: tuple[Tensor, ...] = ()  # x, y, h, cond noise, dequant noise of aligned pairs


def to_tensor(patches: np.ndarray, device: torch.device) -> Tensor:
    """(N, H, W, 3) numpy to (N, 3, H, W) float32 on the device."""
    return torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 3, 1, 2))).to(device)


class TrainingData:
    """The usable images of both domains, their samplers and the fixed validation patches.

    Arguments:
        folders: the image folders.
        cache_dir: the folder of the cached copies at model resolution.
        config: the training settings (a deflow_synth.train.TrainConfig).
        device: where the batches go.
        rank: this process's rank under data parallelism; only rank 0 logs skipped files.
        world_size: the number of ranks; each draws from its own shard of the images.
        jobs: joblib workers for the preparation.
    """

    def __init__(
        self,
        folders: DataFolders,
        cache_dir: Path,
        config: TrainConfig,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        jobs: int = 1,
    ):
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.model_scale = config.model_config().scale

        self.prepare(folders, cache_dir, jobs)
        self.check_usable(folders)
        self.make_samplers()

    def prepare(self, folders: DataFolders, cache: Path, jobs: int) -> None:
        patch, scale = self.config.patch_size, self.config.scale

        clean_paths, clean_others = list_images(folders.clean, "clean")
        self.clean, clean_skipped = cache_images(clean_paths, scale, cache / "clean", patch, jobs)
        degraded_paths, degraded_others = list_images(folders.degraded, "degraded")
        self.degraded, degraded_skipped = cache_images(
            degraded_paths, 1, cache / "degraded", patch, jobs
        )
        self.skipped = clean_others + clean_skipped + degraded_others + degraded_skipped

        self.pairs: list[tuple[CachedImage, CachedImage]] = []
        if folders.paired is not None:
            hr_root, lr_root = folders.paired / "hr", folders.paired / "lr"
            hr_paths, hr_others = list_images(hr_root, "paired HR")
            lr_paths, lr_others = list_images(lr_root, "paired LR")
            matched, unmatched = match_pairs(hr_paths, hr_root, lr_paths, lr_root)
            self.pairs, skipped = cache_pairs(matched, scale, cache / "paired", patch, jobs)
            self.skipped += hr_others + lr_others + unmatched + skipped

        if self.rank == 0:
            for skipped in self.skipped:
                logger.warning("skipped %s", skipped)

    def check_usable(self, folders: DataFolders) -> None:
        for role, folder in (("clean", folders.clean), ("degraded", folders.degraded)):
            if not getattr(self, role):
                raise DeflowError(
                    f"no usable {role} images in {folder}: all "
                    f"{sum(s.path.is_relative_to(folder) for s in self.skipped)} files were "
                    f"skipped (each is named above and in the log)"
                )
        if folders.paired is not None and not self.pairs:
            raise DeflowError(f"no usable aligned pairs in {folders.paired}/hr and lr")

    def make_samplers(self) -> None:
        config = self.config
        seed, patch, align = config.seed, config.patch_size, config.crop_alignment
        split = (HELD_OUT_FRACTION, MAX_HELD_OUT, MIN_TRAINING_IMAGES)

        clean_train, clean_held = split_held_out(self.clean, *split)
        degraded_train, degraded_held = split_held_out(self.degraded, *split)
        self.counts = {
            "clean": len(self.clean),
            "degraded": len(self.degraded),
            "clean_held_out": len(clean_held),
            "degraded_held_out": len(degraded_held),
        }
        if self.pairs:
            self.counts["pairs"] = len(self.pairs)

        rank, world = self.rank, self.world_size

        def sampler(images, stream):
            groups = [[image] for image in shard(images, rank, world)]
            return PatchSampler(groups, patch, seed, stream, align)

        self.samplers = {
            "clean": sampler(clean_train, CLEAN_STREAM),
            "degraded": sampler(degraded_train, DEGRADED_STREAM),
        }
        if self.pairs:
            self.samplers["paired"] = PatchSampler(
                shard(self.pairs, rank, world), patch, seed, PAIRED_STREAM, align
            )

        # Fixed validation patches: from held-out images when there are any.
        self.validation = {}
        for role, held, training in (
            ("clean", clean_held, clean_train), ("degraded", degraded_held, degraded_train)
        ):
            if not held:
                logger.info("too few %s images to hold any out; validating on training ones", role)
            source = PatchSampler(
                [[i] for i in held or training], patch, seed, VALIDATION_STREAM, align
            )
            self.validation[role] = source.draw(0, config.val_patches)[0]
        self.training = {"clean": clean_train, "degraded": degraded_train}

    def color_stats(self) -> list[Tensor]:
        """Per-channel mean and std (3,) of the clean, then the degraded training images."""
        stats = []
        for role in ("clean", "degraded"):
            stats += [torch.tensor(v, dtype=torch.float32)
                      for v in color_statistics(self.training[role])]
        return stats

    def batch(self, step: int, model: DeFlow) -> PatchBatch:
        """The batch of one step: a pure function of the seed, the step and the rank."""
        half, device, rank = self.config.batch_size // 2, self.device, self.rank

        clean = self.samplers["clean"].draw(step, half, rank)[0]
        degraded = self.samplers["degraded"].draw(step, half, rank)[0]
        x, h = self.with_condition(np.concatenate([clean, degraded]), half, model)
        domain = torch.tensor([CLEAN] * half + [DEGRADED] * half, device=device)

        noise_seed = np.random.default_rng([self.config.seed, NOISE_STREAM, step, rank])
        generator = torch.Generator().manual_seed(int(noise_seed.integers(2**62)))
        cond_noise = torch.randn(h.shape, generator=generator).to(device)
        dequant_noise = torch.rand(x.shape, generator=generator).to(device)

        pairs = ()
        if "paired" in self.samplers:
            pair_x, pair_y = self.samplers["paired"].draw(step, half, rank)
            pair_x, pair_h = self.with_condition(pair_x, len(pair_x), model)
            pair_y = model.normalize_colors(to_tensor(pair_y, device), DEGRADED)
            pair_cond_noise = torch.randn(pair_h.shape, generator=generator).to(device)
            pair_dequant_noise = torch.rand(pair_x.shape, generator=generator).to(device)
            pairs = (pair_x, pair_y, pair_h, pair_cond_noise, pair_dequant_noise)

        return PatchBatch(x, h, domain, cond_noise, dequant_noise, pairs)

    def with_condition(
        self, patches: np.ndarray, n_clean: int, model: DeFlow
    ) -> tuple[Tensor, Tensor]:
        """Patches (N, P, P, 3), the first n_clean clean, as model inputs with their h.

        Degraded patches are colour-normalised before h is computed from them, as in sampling.
        """
        x = to_tensor(patches, self.device)
        if model.config.color_normalization and n_clean < len(x):
            x[n_clean:] = model.normalize_colors(x[n_clean:], DEGRADED)
            patches = x.permute(0, 2, 3, 1).cpu().numpy()

        h = condition_images(patches, self.model_scale)
        return x, to_tensor(h, self.device)
