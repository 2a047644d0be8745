"""Training speed (steps/s) and peak memory (RSS) of a preset on the CPU.

Runs ``deflow_synth.train.train`` at the preset's default batch and patch size on the images
of --data (clean/ and degraded/ folders, by default the project's shared photos when present)
or on synthetic images. The first --warmup steps (data preparation, ActNorm start-up, the
allocator's growth) are left out of the speed.

Usage: python benchmarks/bench_train.py [--preset small] [--steps 30] [--threads 2] [--data DIR]
"""

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deflow_synth.train import DataFolders, train, train_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_folders(root: Path, scale: int) -> DataFolders:
    """Eight 384-px clean photos and eight noisy degraded images at 1/scale of that size."""
    rng = np.random.default_rng(0)
    for name, size, noise in (("clean", 384, 0.0), ("degraded", 384 // scale, 0.05)):
        (root / name).mkdir(parents=True)
        for i in range(8):
            base = rng.uniform(0.2, 0.8, (8, 8, 3))
            image = np.kron(base, np.ones((size // 8, size // 8, 1)))
            image = image + rng.normal(0, noise, image.shape) if noise else image
            pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")

    return DataFolders(root / "clean", root / "degraded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED_DATA if SHARED_DATA.is_dir() else None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = train_config(
        args.preset, steps=args.steps, checkpoint_every=args.steps, validate_every=10**9
    )
    times = {}

    def record(report) -> None:
        times[report.step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if args.data is not None:
            folders = DataFolders(args.data / "clean", args.data / "degraded")
            source = str(args.data)
        else:
            folders = synthetic_folders(root / "data", config.scale)
            source = "synthetic images"
        train(folders, root / "run", config, device="cpu", on_progress=record)

    measured = args.steps - args.warmup
    rate = measured / (times[args.steps] - times[args.warmup])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"train, preset {args.preset}, {source}, CPU, {args.threads} threads")
    print(f"batch {config.batch_size} patches of {config.patch_size} px, {measured} timed steps")
    print(f"{'steps/s':>10} {'s/step':>8} {'peak RSS MiB':>14}")
    print(f"{rate:>10.3f} {1 / rate:>8.2f} {peak_rss:>14.0f}")


if __name__ == "__main__":
    main()
