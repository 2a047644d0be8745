"""Downsample a folder of images with MATLAB-style bicubic, keeping the relative names.

    python scripts/bicubic_downsample.py pairs/hr pairs/bicubic --scale 4

Gives the clean LR counterparts of `deflow-synth degrade` output for
`deflow-synth inspect pairs/lr REAL --clean pairs/bicubic`. Each image is cropped to a
multiple of the scale first, as degrade does; outputs are 8-bit PNG, written atomically, and
files already there are kept. Unreadable images are reported and skipped (exit code 1).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from deflow_synth._basicsr import imresize
from deflow_synth.data import list_images
from deflow_synth.errors import DeflowError
from deflow_synth.imageio import ImageError, read_image, write_png_atomic


def downsample(source: Path, target: Path, scale: int) -> None:
    """One image: crop to a multiple of the scale, resize, quantise, write."""
    image = read_image(source).astype(np.float64)
    height, width = image.shape[0] // scale * scale, image.shape[1] // scale * scale
    small = np.clip(imresize(image[:height, :width], 1 / scale), 0, 1)

    write_png_atomic(target, np.round(small * 255).astype(np.uint8))


def main() -> None:
    """Command line: downsample every image under a folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args()

    try:
        paths, _ = list_images(args.input_dir, "input")
    except DeflowError as error:
        sys.exit(f"error: {error}")

    failed = 0
    for path in paths:
        target = (args.output_dir / path.relative_to(args.input_dir)).with_suffix(".png")
        if target.exists():
            continue
        try:
            downsample(path, target, args.scale)
        except ImageError as error:
            print(f"skipped {error}", file=sys.stderr)
            failed += 1
    print(f"{len(paths) - failed} of {len(paths)} images in {args.output_dir}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
