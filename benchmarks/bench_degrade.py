"""Speed (HR megapixels per second) and peak memory of ``degrade`` on the CPU.

Each case runs the whole pipeline (read, crop, bicubic x4 downsampling, tiled translation,
PNG writing) on one synthetic photo of 1, 4 or 12 MP, in a fresh process so that its peak RSS
is its own. The model is the shipped default when present, else a random-weight model of the
same preset (the speed does not depend on the weights). Reading and writing run in-process
(--workers 0), so the peak RSS covers everything. Importing torch and basicsr alone takes
about 0.75 GiB of RSS here (CUDA libraries); the peak is also shown over the RSS after the
model is loaded, with Linux's peak-RSS counter reset at that point. A last case translates
the 4 MP image in one piece, to show what tiling saves.

Usage: python benchmarks/bench_degrade.py [--threads 1] [--preset small] [--tile auto]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = {"1 MP": (1152, 864), "4 MP": (2304, 1728), "12 MP": (4000, 3000)}


def synthetic_photo(width: int, height: int, path: Path) -> None:
    """Smooth shading, hard-edged blocks and fine grain, so PNG sizes are photo-like."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    image = 0.5 + 0.2 * np.sin(9 * x + 5 * y)[..., None] * np.array([1, 0.8, 0.6], np.float32)
    blocks = rng.uniform(-0.2, 0.2, (height // 64 + 1, width // 64 + 1, 3)).astype(np.float32)
    image = image + np.kron(blocks, np.ones((64, 64, 1), np.float32))[:height, :width]
    image = image + rng.normal(0, 0.02, image.shape).astype(np.float32)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) of this process in MiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    current, peak = (int(re.search(rf"{key}:\s+(\d+)", status)[1]) for key in ("VmRSS", "VmHWM"))
    return current / 1024, peak / 1024


def reset_peak_memory() -> None:
    """Make the peak-RSS counter start again from the current RSS (Linux clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_case(input_dir: Path, tile: int | None, preset_name: str, threads: int) -> dict:
    """One degrade run in this process; the caller starts a fresh process per case."""
    from deflow_synth.checkpoint import default_model_path
    from deflow_synth.config import preset
    from deflow_synth.convert import DegradeOptions, ModelInfo, degrade_folder, load_for_degrade
    from deflow_synth.model import DeFlow

    torch.set_num_threads(threads)
    path = default_model_path()
    if path.is_file() and preset_name == "small":
        model, info = load_for_degrade(path, None, "cpu")
        source = path.name
    else:
        torch.manual_seed(0)
        model = DeFlow(preset(preset_name)).eval()
        info = ModelInfo("random", "-", "0" * 64, model.config.to_dict())
        source = f"random-weight {preset_name}"
    reset_peak_memory()
    baseline = memory_mib()[0]

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        options = DegradeOptions(tile=tile, workers=0, device="cpu")
        started = time.perf_counter()
        summary = degrade_folder(input_dir, out, model, info, options)
        seconds = time.perf_counter() - started
        record = json.loads((out / "manifest.json").read_text())["pairs"][0]

    assert summary.done == 1, summary.problems
    peak = memory_mib()[1]
    return {
        "megapixels": summary.megapixels,
        "lr": "x".join(map(str, record["lr_size"])),
        "tile": record["tile"],
        "seconds": seconds,
        "peak": peak,
        "baseline": baseline,
        "model": source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tile", type=int, default=None, help="LR pixels; default: automatic")
    parser.add_argument("--case", nargs=2, metavar=("INPUT", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        input_dir, tile = Path(args.case[0]), args.case[1]
        tile = None if tile == "auto" else int(tile)
        print(json.dumps(run_case(input_dir, tile, args.preset, args.threads)))
        return

    tile = "auto" if args.tile is None else str(args.tile)
    cases = [(size, tile) for size in SIZES] + [("4 MP", "0")]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for size, (width, height) in SIZES.items():
            (Path(folder) / size).mkdir()
            synthetic_photo(width, height, Path(folder) / size / "photo.png")
        for size, case_tile in cases:
            command = [
                sys.executable, __file__, "--case", str(Path(folder) / size), case_tile,
                "--threads", str(args.threads), "--preset", args.preset,
            ]  # fmt: skip
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append({"size": size, **json.loads(output.strip().splitlines()[-1])})

    print(
        f"degrade, preset {args.preset} ({results[0]['model']}), CPU, {args.threads} torch "
        "thread(s), reading and writing in-process (--workers 0), overlap 64 LR px"
    )
    print(
        f"{'image':>6} {'HR MP':>6} {'LR size':>10} {'tile':>6} {'seconds':>8} {'MP/s':>6} "
        f"{'peak RSS MiB':>13} {'over start MiB':>15}"
    )
    for r in results:
        tile_text = "none" if r["tile"] is None else str(r["tile"])
        print(
            f"{r['size']:>6} {r['megapixels']:>6.2f} {r['lr']:>10} {tile_text:>6} "
            f"{r['seconds']:>8.1f} {r['megapixels'] / r['seconds']:>6.2f} "
            f"{r['peak']:>13.0f} {r['peak'] - r['baseline']:>15.0f}"
        )


if __name__ == "__main__":
    main()
