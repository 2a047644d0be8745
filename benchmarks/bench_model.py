"""Parameter counts of each preset and the CPU time of one encode + decode.

Usage: python benchmarks/bench_model.py [--size 128] [--threads 2] [--presets small aim-x8]
"""

import argparse
import time

import torch

from deflow_synth.config import PRESETS, preset
from deflow_synth.model import CLEAN, DeFlow


def time_encode_decode(name: str, size: int, repeats: int) -> tuple[int, float, float]:
    torch.manual_seed(0)
    model = DeFlow(preset(name)).eval()
    x = torch.rand(1, 3, size, size)

    timings = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            cond = model.condition(model.condition_image(x))
            latents, _ = model.encode(x, cond, CLEAN)
            model.decode(latents, cond)
            timings.append(time.perf_counter() - start)

    n_parameters = sum(p.numel() for p in model.parameters())
    return n_parameters, min(timings), sum(timings) / len(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"encode+decode of one 3x{args.size}x{args.size} image, {args.threads} threads, CPU")
    print(f"{'preset':<10} {'parameters':>12} {'best s':>8} {'mean s':>8}")
    for name in args.presets:
        n_parameters, best, mean = time_encode_decode(name, args.size, args.repeats)
        print(f"{name:<10} {n_parameters:>12,} {best:>8.2f} {mean:>8.2f}")


if __name__ == "__main__":
    main()
